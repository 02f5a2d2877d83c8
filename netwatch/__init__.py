"""netwatch: network connectivity monitoring and resilience daemon."""

import sys
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("netwatch")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+source"

__all__ = ["__version__"]

# structlog imports rich whenever it is installed (for console tracebacks): about 5 MB of
# resident memory that a daemon logging JSON lines never uses. Import it with rich hidden
# (a None entry in sys.modules makes that import fail, as if rich were not installed);
# netwatch.logs renders console tracebacks with rich itself, imported on demand. The CLI
# commands that draw tables still import rich as usual.
if "structlog" not in sys.modules and "rich" not in sys.modules:
    sys.modules["rich"] = None  # type: ignore[assignment]
    try:
        import structlog  # noqa: F401
    finally:
        del sys.modules["rich"]
