"""deskpush's I/O layer around the sans-I/O core in ``deskpush.protocol``.

Read in this order; each module opens with what it owns:

* ``app``: ``DeskpushServer``, one node: puts the parts below together, routes
  each handshake, starts and stops;
* ``connection``: one TCP connection, HTTP then RFC 6455, on websockets'
  public sans-I/O ``ServerProtocol``, with deskpush's own path for the
  common data frame;
* ``endpoints``: ``/agent`` and ``/integrator`` on one code path (hello, rate
  limit, decode, errors);
* ``dispatch``: engine effects to writes, and the one timer;
* ``clock``: the engine's time on the event loop (tests use a fake one);
* ``listener``: the listening sockets, and accepting when file descriptors
  run out;
* ``web``: ``/healthz``, ``/livez``, ``/readyz``, ``/stats`` and the demo's static files;
* ``state``: pending notifications across a restart;
* ``auth``, ``config``, ``logs``, ``cli``: tokens and keys, the TOML file,
  logging off the hot path, the ``deskpush`` command.
"""

__version__ = "0.1.0"

from .app import DeskpushServer  # noqa: E402
from .config import Config, ConfigError, load  # noqa: E402

__all__ = ["DeskpushServer", "Config", "ConfigError", "load", "__version__"]
