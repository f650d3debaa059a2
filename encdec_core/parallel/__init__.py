from .context import ParallelContext, SINGLE

__all__ = ["ParallelContext", "SINGLE"]
