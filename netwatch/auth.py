"""Optional bearer tokens for the operator endpoints (``metrics.token``, ``proxy.admin_token``).

Without a token an endpoint is open, as before. With one, a request must carry
``Authorization: Bearer TOKEN``; anything else is answered ``401`` with a
``WWW-Authenticate`` challenge. The comparison takes the same time whatever the guess.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

REALM = "netwatch"


def authorized(request: web.Request, token: str) -> bool:
    """Whether the request carries ``token`` as its bearer credentials."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def require_token(token: str | None, handler: Handler) -> Handler:
    """``handler`` behind the bearer ``token``; unchanged when there is no token."""
    if not token:
        return handler

    async def guarded(request: web.Request) -> web.StreamResponse:
        if not authorized(request, token):
            return web.json_response(
                {"error": "unauthorized"},
                status=401,
                headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'},
            )
        return await handler(request)

    return guarded
