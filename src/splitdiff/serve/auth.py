"""Bearer-token auth for the API routes.

Checked in an ASGI middleware, before the body is read: a client without the token
can neither make the server buffer a body nor learn anything from validation
errors. The comparison is constant-time. /healthz, /metrics and the docs stay open
(bind the server to a private interface, or put them behind a proxy).
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import UserError
from .schemas import error_response

ENV_VAR = "SPLITDIFF_TOKEN"


def load_token(token_file: Path | None) -> str | None:
    """The token from `token_file`, else from $SPLITDIFF_TOKEN when set; None means no auth."""
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read the token file {token_file}: {getattr(e, 'strerror', None) or e}") from None
        if not token:
            raise UserError(f"the token file {token_file} is empty")
        return token
    return os.environ.get(ENV_VAR) or None


def token_matches(authorization: str | None, token: str) -> bool:
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


class BearerAuth:
    """401 for requests under `prefix` that lack `Authorization: Bearer <token>`."""

    def __init__(self, app: ASGIApp, token: str, prefix: str = "/v1/"):
        self.app, self.token, self.prefix = app, token, prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefix):
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not token_matches(header, self.token):
                response = error_response(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)
