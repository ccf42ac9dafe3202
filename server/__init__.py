"""deskpush's I/O layer: websockets endpoints, auth, config, the timer and the CLI."""

__version__ = "0.1.0"

from .app import DeskpushServer  # noqa: E402
from .config import Config, ConfigError, load  # noqa: E402

__all__ = ["DeskpushServer", "Config", "ConfigError", "load", "__version__"]
