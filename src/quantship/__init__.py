"""quantship: quantize, prove, ship."""

__version__ = "0.1.0"

__all__ = ["__version__", "bench", "evaluate", "load", "quantize", "verify"]


def __getattr__(name: str):
    # The API imports torch and transformers (seconds); `quantship --help` and `import quantship`
    # stay fast by importing it on first use.
    if name in __all__[1:]:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'quantship' has no attribute {name!r}")
