"""One error type for the API, and the one place that maps it to an HTTP status and OpenAI's shape."""

from __future__ import annotations

from .protocol import ErrorBody, ErrorResponse

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
