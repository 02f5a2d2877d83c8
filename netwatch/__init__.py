"""netwatch: network connectivity monitoring and resilience daemon."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("netwatch")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
