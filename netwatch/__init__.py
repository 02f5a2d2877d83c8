"""netwatch: network connectivity monitoring and resilience daemon."""

import sys
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("netwatch")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+source"

__all__ = ["__version__"]


# structlog imports rich whenever it is installed (for console tracebacks, about 5 MB of
# resident memory) and greenlet (for its deprecated thread-local context), neither of which
# a daemon logging JSON lines uses. Import structlog with both hidden (a None entry in
# sys.modules makes their import fail, as if they were not installed); netwatch.logs renders
# console tracebacks with rich itself, imported on demand, and the CLI commands that draw
# tables still import rich as usual.
def _import_structlog_without_extras() -> None:
    hidden = [name for name in ("rich", "greenlet") if name not in sys.modules]
    sys.modules.update(dict.fromkeys(hidden))  # type: ignore[arg-type]
    try:
        import structlog  # noqa: F401, PLC0415
    finally:
        for name in hidden:
            del sys.modules[name]


if "structlog" not in sys.modules:
    _import_structlog_without_extras()
