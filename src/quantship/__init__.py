"""quantship: quantize, prove, ship."""

__version__ = "0.1.0"

from .api import bench, evaluate, load, quantize, verify  # noqa: E402

__all__ = ["__version__", "bench", "evaluate", "load", "quantize", "verify"]
