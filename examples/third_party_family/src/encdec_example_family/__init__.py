"""An example third-party encdec family (MarianMT). See plugin.py and the README."""
__version__ = "0.1.0"
