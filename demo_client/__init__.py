"""deskpush's clients: the browser agent desktop and the integrator SDKs.

The static files here (``index.html``, ``desktop.js``, ``cif.js``, the
integrator page) are what the server serves at ``/``. The Python SDK for
integrators is ``deskpush.client.Integrator``::

    from deskpush.client import Integrator, CIFError

    async with Integrator("ws://127.0.0.1:8765/integrator", api_key, agent_id="agent-1") as ig:
        value = await ig.notify_event({"templateName": "msdyn_chat_incoming_unauthenticated"})
"""

from .integrator import (
    RESUME_NOW,
    CIFError,
    Integrator,
    IntegratorConnectionError,
    IntegratorError,
    OutcomeUnknownError,
    Reconnect,
    Resumed,
    Status,
    UnauthorizedError,
)

__all__ = [
    "CIFError",
    "Integrator",
    "IntegratorConnectionError",
    "IntegratorError",
    "OutcomeUnknownError",
    "RESUME_NOW",
    "Reconnect",
    "Resumed",
    "Status",
    "UnauthorizedError",
]
