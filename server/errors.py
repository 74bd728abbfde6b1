"""One error type for the API, and the one place that maps it to an HTTP status and OpenAI's shape:
``error_response``, and the app's handlers (``add_error_handlers``) that answer unknown routes, wrong
methods and bugs in that shape too."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from .logs import HEADER as REQUEST_ID_HEADER
from .logs import request_info
from .protocol import ErrorBody, ErrorResponse

log = logging.getLogger("chatserve.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",  # the client did not send its body in time
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after
        self.extra_headers = headers or {}  # e.g. Allow on a 405, Connection: close on a 408

    def body(self) -> dict:
        return ErrorResponse(
            error=ErrorBody(
                message=self.message, type=_TYPES.get(self.status, "server_error"), param=self.param, code=self.code
            )
        ).model_dump()

    def headers(self) -> dict[str, str]:
        retry = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
        return {**self.extra_headers, **retry}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


def add_error_handlers(app: FastAPI) -> None:
    """Answer an APIError, an unknown route (404), a wrong method (405) and an unhandled exception
    (500, logged) in OpenAI's error shape."""

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(404)
    async def _not_found(request: Request, _exc):
        return error_response(APIError(404, f"no route {request.method} {request.url.path}", code="not_found"))

    @app.exception_handler(405)
    async def _bad_method(request: Request, exc):
        # Starlette's 405 carries the Allow header (RFC 9110 requires it); keep it
        return error_response(
            APIError(
                405,
                f"method {request.method} not allowed on {request.url.path}",
                code="method_not_allowed",
                headers=getattr(exc, "headers", None),
            )
        )

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        # answered by Starlette's outermost middleware, outside the request-id one: the id is taken
        # from the request's state, where that one put it
        rid = request_info(request.scope).get("request_id")
        log.exception("unhandled error", extra={"request_id": rid})
        return error_response(
            APIError(
                500,
                f"internal error: {type(exc).__name__}",
                code="internal_error",
                headers={REQUEST_ID_HEADER: rid} if rid else None,
            )
        )
