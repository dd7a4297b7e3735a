"""What every HTTP request passes before a route runs: a request id, the API key, the body-size limit.

A plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which buffers and hides disconnects from
streaming responses). Settings come from `app.state.guard`, set by the ingress replica.
"""

from __future__ import annotations

import hmac
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from router.errors import HTTPError, error_response

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/health/ready"})  # liveness and readiness probes never need a key


@dataclass
class GuardSettings:
    api_key: str | None
    max_body_bytes: int
    metrics: Any = None  # router.metrics.RequestMetrics: refused generation requests count too


def key_matches(header: str | None, api_key: str) -> bool:
    """Constant-time comparison of `Authorization: Bearer <key>` with the configured key."""
    given = header or ""
    token = given[7:].strip() if given[:7].lower() == "bearer " else ""
    return hmac.compare_digest(token.encode(), api_key.encode())


class Guard:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = _serve_request_id() or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        settings: GuardSettings | None = getattr(scope["app"].state, "guard", None)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):  # an app under a route prefix sees its own paths
            path = path[len(root):] or "/"
        problem = self._check(path, headers, settings)
        if problem is not None:
            log.info("request %s %s %s: %d", request_id, scope["method"], scope["path"], problem.status)
            if settings.metrics is not None and path in ("/v1/completions", "/v1/chat/completions"):
                settings.metrics.ticket(path, "http").close("client_error")
            return await error_response(problem, request_id)(scope, receive, send)
        limit = settings.max_body_bytes if settings else None

        async def limited_receive():
            message = await receive()
            if limit is not None and message["type"] == "http.request":
                limited_receive.seen += len(message.get("body", b""))
                if limited_receive.seen > limit:
                    raise BodyTooLarge()
            return message

        limited_receive.seen = 0

        try:
            await self.app(scope, limited_receive, send)
        except BodyTooLarge:
            await error_response(HTTPError(413, f"the request body exceeds {limit} bytes"), request_id)(
                scope, receive, send)

    @staticmethod
    def _check(path: str, headers: dict[str, str], settings: GuardSettings | None) -> HTTPError | None:
        if settings is None or path in OPEN_PATHS:
            return None
        if settings.api_key is not None and not key_matches(headers.get("authorization"), settings.api_key):
            return HTTPError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return HTTPError(413, f"the request body exceeds {settings.max_body_bytes} bytes")
        return None


class BodyTooLarge(Exception):
    pass


def _serve_request_id() -> str | None:
    """Serve's id for this request (it also sends it back as `x-request-id`), so logs, bodies and the
    header agree."""
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or None
    except Exception:  # outside a Serve replica
        return None
