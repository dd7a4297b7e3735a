"""Typed, transport-neutral engine errors: each carries its row of the error table (DESIGN.md §4), so
both doors map it the same way and nothing else keeps a copy.

| class             | HTTP | gRPC               | OpenAI error type     |
| InvalidRequest    | 400  | INVALID_ARGUMENT   | invalid_request_error |
| ContextTooLong    | 400  | INVALID_ARGUMENT   | invalid_request_error |
| QueueFull         | 429  | RESOURCE_EXHAUSTED | rate_limit_error      |
| Unavailable       | 503  | UNAVAILABLE        | service_unavailable   |
| DeadlineExceeded  | 504  | DEADLINE_EXCEEDED  | timeout               |
| InternalError     | 500  | INTERNAL           | internal_error        |

gRPC codes are `grpc.StatusCode` names (workers/ does not import grpc). The router adds
`HTTPError` for what only the front door refuses (401, 404, 413).
"""

from __future__ import annotations


class EngineError(Exception):
    http_status = 500
    grpc_code = "INTERNAL"
    error_type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param  # the request field at fault, when there is one

    def __reduce__(self):  # survive pickling across Ray calls with the keyword argument
        return (_rebuild, (type(self), self.message, self.param))


def _rebuild(cls, message, param):
    return cls(message, param=param)


class InvalidRequest(EngineError):
    http_status, grpc_code, error_type = 400, "INVALID_ARGUMENT", "invalid_request_error"


class ContextTooLong(InvalidRequest):
    @classmethod
    def check(cls, limit: int, reason: str, prompt_tokens: int, max_tokens: int | None) -> None:
        """Raised when a prompt and its completion cannot fit `limit` tokens (`max_tokens` None: the
        completion may take the rest, so the prompt must leave at least one token)."""
        if max_tokens is None:
            if prompt_tokens >= limit:
                raise cls(f"This model's maximum context length is {limit} tokens (set by {reason}). However, "
                          f"your prompt has {prompt_tokens} tokens, leaving none to generate.", param="prompt")
        elif prompt_tokens + max_tokens > limit:
            raise cls(f"This model's maximum context length is {limit} tokens (set by {reason}). However, you "
                      f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} "
                      f"in the completion).", param="max_tokens")


class QueueFull(EngineError):
    http_status, grpc_code, error_type = 429, "RESOURCE_EXHAUSTED", "rate_limit_error"


class Unavailable(EngineError):
    http_status, grpc_code, error_type = 503, "UNAVAILABLE", "service_unavailable"


class Draining(Unavailable):
    """The gang is leaving (scaled down, redeployed): the request moves to another gang, a planned move
    that does not count against `migration_limit`."""


class RankLeaving(Draining):
    """One attention rank leaves its gang (the gang scaled its attention side down) while the gang
    serves on: the request moves, planned, and the gang stays ready."""


class DeadlineExceeded(EngineError):
    http_status, grpc_code, error_type = 504, "DEADLINE_EXCEEDED", "timeout"


class InternalError(EngineError):
    pass
