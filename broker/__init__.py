"""token-broker: keeps OAuth 2.0 access tokens fresh and serves them over localhost."""

import sys

# A constant, not importlib.metadata: that import costs 3 MiB and 50 ms at every start.
from broker._version import __version__

# `import structlog` imports structlog.dev, which imports rich wherever rich is installed
# (3.4 MiB, 40 ms) only to draw tracebacks in the console renderer. `serve` writes JSON and
# `dev` is content with plain tracebacks, so rich is hidden while structlog is first imported;
# afterwards it imports normally for anyone else.
if "structlog" not in sys.modules and "rich" not in sys.modules:
    sys.modules["rich"] = None  # type: ignore[assignment]
    try:
        import structlog  # noqa: F401
    finally:
        del sys.modules["rich"]

__all__ = ["__version__"]
