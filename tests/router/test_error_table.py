"""The error table lives in the typed errors; both doors read it from there (no Ray needed)."""

import pickle

import grpc
import pytest

from router.errors import HTTPError, error_body, grpc_code_name, status_of
from workers.errors import (ContextTooLong, DeadlineExceeded, InternalError, InvalidRequest, QueueFull,
                            Unavailable)

TABLE = [(InvalidRequest("x"), 400, "INVALID_ARGUMENT", "invalid_request_error"),
         (ContextTooLong("x"), 400, "INVALID_ARGUMENT", "invalid_request_error"),
         (QueueFull("x"), 429, "RESOURCE_EXHAUSTED", "rate_limit_error"),
         (Unavailable("x"), 503, "UNAVAILABLE", "service_unavailable"),
         (DeadlineExceeded("x"), 504, "DEADLINE_EXCEEDED", "timeout"),
         (InternalError("x"), 500, "INTERNAL", "internal_error"),
         (HTTPError(401, "x"), 401, "UNAUTHENTICATED", "authentication_error"),
         (HTTPError(404, "x"), 404, "NOT_FOUND", "not_found_error"),
         (HTTPError(413, "x"), 413, "INVALID_ARGUMENT", "invalid_request_error"),
         (RuntimeError("a bug"), 500, "INTERNAL", "internal_error")]


@pytest.mark.parametrize("exc, status, code, kind", TABLE, ids=lambda v: type(v).__name__ if isinstance(v, Exception) else None)
def test_each_error_carries_its_row(exc, status, code, kind):
    assert status_of(exc) == (status, kind)
    assert grpc.StatusCode[grpc_code_name(exc)] == getattr(grpc.StatusCode, code)
    again = pickle.loads(pickle.dumps(exc))  # errors cross Ray calls by pickle
    assert status_of(again) == (status, kind) and grpc_code_name(again) == code


def test_bodies_hide_untyped_errors():
    status, body = error_body(RuntimeError("secret prompt text"), "rid-1")
    assert status == 500 and "secret" not in body["error"]["message"] and body["error"]["request_id"] == "rid-1"
