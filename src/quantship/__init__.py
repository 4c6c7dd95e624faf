"""quantship: quantize, prove, ship."""

__version__ = "0.1.0"

from .api import evaluate, load, quantize, verify  # noqa: E402

__all__ = ["__version__", "evaluate", "load", "quantize", "verify"]
