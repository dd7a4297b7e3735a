"""Typed, transport-neutral engine errors. The router maps `code` to HTTP and gRPC status once.

| class             | code               | HTTP | gRPC               |
| InvalidRequest    | invalid_request    | 400  | INVALID_ARGUMENT   |
| ContextTooLong    | invalid_request    | 400  | INVALID_ARGUMENT   |
| QueueFull         | queue_full         | 429  | RESOURCE_EXHAUSTED |
| Unavailable       | unavailable        | 503  | UNAVAILABLE        |
| DeadlineExceeded  | deadline_exceeded  | 504  | DEADLINE_EXCEEDED  |
| InternalError     | internal           | 500  | INTERNAL           |
"""

from __future__ import annotations


class EngineError(Exception):
    code = "internal"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param  # the request field at fault, when there is one

    def __reduce__(self):  # survive pickling across Ray calls with the keyword argument
        return (_rebuild, (type(self), self.message, self.param))


def _rebuild(cls, message, param):
    return cls(message, param=param)


class InvalidRequest(EngineError):
    code = "invalid_request"


class ContextTooLong(InvalidRequest):
    pass


class QueueFull(EngineError):
    code = "queue_full"


class Unavailable(EngineError):
    code = "unavailable"


class DeadlineExceeded(EngineError):
    code = "deadline_exceeded"


class InternalError(EngineError):
    code = "internal"
