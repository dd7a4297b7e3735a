"""HTTP error bodies from typed errors, whose classes carry the table of DESIGN.md §4 (`workers.errors`).

Bodies carry the request id and never a traceback or prompt text; anything unexpected is a 500 with a
generic message (the details go to the log, with the request id).
"""

from __future__ import annotations

import logging

from starlette.responses import JSONResponse

from workers.errors import EngineError

log = logging.getLogger(__name__)


class HTTPError(EngineError):
    """Errors only the front door raises: auth, unknown model, body size, unsupported features."""

    _ROWS = {401: ("UNAUTHENTICATED", "authentication_error"), 404: ("NOT_FOUND", "not_found_error"),
             413: ("INVALID_ARGUMENT", "invalid_request_error")}

    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str | None = None):
        super().__init__(message, param=param)
        self.http_status = status
        grpc_code, error_type = self._ROWS.get(status, ("INVALID_ARGUMENT", "invalid_request_error"))
        self.grpc_code, self.error_type = grpc_code, kind or error_type

    @property
    def status(self) -> int:
        return self.http_status

    def __reduce__(self):
        return (HTTPError, (self.http_status, self.message), {"param": self.param, "error_type": self.error_type})


def status_of(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, OpenAI error type) from the error's own row of the table; anything untyped is a 500."""
    if isinstance(exc, EngineError):
        return exc.http_status, exc.error_type
    return 500, "internal_error"


def grpc_code_name(exc: BaseException) -> str:
    return exc.grpc_code if isinstance(exc, EngineError) else "INTERNAL"


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
    if status >= 500:  # an untyped failure's traceback is what "the request id is in the server log" finds
        log.warning("request %s: %d %s", request_id, status, body["error"]["message"],
                    exc_info=exc if status == 500 else None)
    return JSONResponse(body, status_code=status, headers=headers)
