"""CUDA fast path: a static-shape decoder step (compiled, replayed from CUDA graphs)."""
from .runner import CudaGraphRunner, StaticDecoder

__all__ = ["CudaGraphRunner", "StaticDecoder"]
