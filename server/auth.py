"""The API key check: requests to the protected paths (/v1/, and /metrics when asked) must send
``Authorization: Bearer KEY``; others get a 401 in OpenAI's error shape."""

from __future__ import annotations

import hmac

from .errors import APIError


class APIKeyMiddleware:
    """Plain ASGI middleware (BaseHTTPMiddleware would hide client disconnects from the routes)."""

    def __init__(self, app, api_key: str, on_error, protect: tuple[str, ...] = ("/v1/",)):
        self.app = app
        self.key = api_key.encode()
        self.on_error = on_error
        self.protect = protect

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(self.protect):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                response = self.on_error(
                    APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)", code="invalid_api_key")
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
