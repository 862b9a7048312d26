"""token-broker: keeps OAuth 2.0 access tokens fresh and serves them over localhost."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("token-broker")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
