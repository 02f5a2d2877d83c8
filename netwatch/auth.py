"""Optional bearer tokens for the operator endpoints (``metrics.token``, ``proxy.admin_token``).

Without a token an endpoint is open, as before. With one, a request must carry
``Authorization: Bearer TOKEN``; anything else is answered ``401`` with a
``WWW-Authenticate`` challenge. The comparison takes the same time whatever the guess.

The check and the refusal are plain values here, so that the site daemon's own HTTP server
(``netwatch.monitor.httpd``) gives the same answers without loading aiohttp;
``require_token`` wraps an aiohttp handler (the station proxy's endpoints).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from aiohttp import web

    Handler: TypeAlias = Callable[[web.Request], Awaitable[web.StreamResponse]]

REALM = "netwatch"
# The refusal: status, headers and the JSON body.
UNAUTHORIZED = 401
CHALLENGE = {"WWW-Authenticate": f'Bearer realm="{REALM}"'}
REFUSAL = {"error": "unauthorized"}


def authorized(authorization: str, token: str) -> bool:
    """Whether an ``Authorization`` header value carries ``token`` as bearer credentials."""
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token.encode())


def require_token(token: str | None, handler: Handler) -> Handler:
    """``handler`` behind the bearer ``token``; unchanged when there is no token."""
    if not token:
        return handler
    from aiohttp import web  # noqa: PLC0415 - only the aiohttp servers need it

    async def guarded(request: web.Request) -> web.StreamResponse:
        if not authorized(request.headers.get("Authorization", ""), token):
            return web.json_response(REFUSAL, status=UNAUTHORIZED, headers=CHALLENGE)
        return await handler(request)

    return guarded
