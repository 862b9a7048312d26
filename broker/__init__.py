"""token-broker: keeps OAuth 2.0 access tokens fresh and serves them over localhost."""

import importlib
import sys

# A constant, not importlib.metadata: that import costs 3 MiB and 50 ms at every start.
from broker._version import __version__


def import_without(module: str, hidden: str) -> None:
    """Import `module` for the first time as if `hidden` were not installed.

    For libraries that pull in a heavy optional package at import wherever it is installed;
    afterwards `hidden` imports normally for anyone else. Nothing happens when either one is
    already imported.
    """
    if module in sys.modules or hidden in sys.modules:
        return
    sys.modules[hidden] = None  # type: ignore[assignment]
    try:
        importlib.import_module(module)
    finally:
        del sys.modules[hidden]


# `import structlog` imports structlog.dev, which imports rich wherever rich is installed
# (3.4 MiB, 40 ms) only to draw tracebacks in the console renderer. `serve` writes JSON and
# `dev` is content with plain tracebacks.
import_without("structlog", hidden="rich")

__all__ = ["__version__", "import_without"]
