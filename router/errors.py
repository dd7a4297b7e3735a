"""The error table of DESIGN.md §4, implemented once: typed errors → HTTP status and OpenAI-style body.

Bodies carry the request id and never a traceback or prompt text; anything unexpected is a 500 with a
generic message (the details go to the log, with the request id).
"""

from __future__ import annotations

import logging

from starlette.responses import JSONResponse

from workers.errors import (ContextTooLong, DeadlineExceeded, EngineError, InternalError, InvalidRequest,
                            QueueFull, Unavailable)

log = logging.getLogger(__name__)


class HTTPError(EngineError):
    """Errors only the HTTP front raises: auth, unknown model, body size, unsupported features."""

    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str | None = None):
        super().__init__(message, param=param)
        self.status = status
        self.kind = kind

    def __reduce__(self):
        return (HTTPError, (self.status, self.message), {"param": self.param, "kind": self.kind})


# (engine error class, HTTP status, OpenAI error type); first match wins
_TABLE: list[tuple[type[Exception], int, str]] = [
    (ContextTooLong, 400, "invalid_request_error"),
    (InvalidRequest, 400, "invalid_request_error"),
    (QueueFull, 429, "rate_limit_error"),
    (Unavailable, 503, "service_unavailable"),
    (DeadlineExceeded, 504, "timeout"),
    (InternalError, 500, "internal_error"),
]

_HTTP_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable",
               504: "timeout"}


def status_of(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, HTTPError):
        return exc.status, exc.kind or _HTTP_TYPES.get(exc.status, "invalid_request_error")
    for cls, status, kind in _TABLE:
        if isinstance(exc, cls):
            return status, kind
    return 500, "internal_error"


def error_body(exc: BaseException, request_id: str) -> tuple[int, dict]:
    status, kind = status_of(exc)
    if status >= 500 and not isinstance(exc, EngineError):
        log.error("request %s failed: %s: %s", request_id, type(exc).__name__, exc)
        message = "internal server error; the request id is in the server log"
    else:
        message = getattr(exc, "message", None) or str(exc)
    return status, {"error": {"message": message, "type": kind, "param": getattr(exc, "param", None),
                              "code": status, "request_id": request_id}}


def error_response(exc: BaseException, request_id: str, retry_after_s: int = 2) -> JSONResponse:
    status, body = error_body(exc, request_id)
    headers = {}
    if status in (429, 503):
        headers["retry-after"] = str(retry_after_s)
    if status >= 500:
        log.warning("request %s: %d %s", request_id, status, body["error"]["message"])
    return JSONResponse(body, status_code=status, headers=headers)
