"""Thin-client HTTP endpoints, as the original's HTTP transport (SPEC.md 4.4), with JSON and CORS.

| request | body | 200 answer |
| --- | --- | --- |
| `<any method> /store/query?token=<base58 token>` | `EntityQuery` | `EntityResults` |
| `<any method> /store/mutate?token=<base58 token>` | `MutationRequest` | `MutationResult` |

Bodies are encoded protobuf (the original's clients), or protobuf JSON when the request says
``Content-Type: application/json`` (the answer is then JSON too; `Any` traits are written with
``"@type": "type.googleapis.com/<full name>"`` and resolved through the generated descriptor pool).
The token may also come as ``Authorization: Bearer <token>``.

Status codes (the original's, plus what it lacked):

| status | when |
| --- | --- |
| 200 | the store's answer |
| 400 | the body does not decode, or the store refused the request (invalid query, mutation...) |
| 401 | token missing, malformed, expired, or with a bad signature |
| 404 | unknown path; token made for another cell, or signed by a node that is not in the cell |
| 413 | body larger than the gateway's `request_bytes_max` |
| 429 | too many concurrent calls with this token |
| 500 | the store failed (internal error, deadline exceeded) |
| 503 | no store replica is available |

Error answers carry a one-line text body (a JSON ``{"error": ...}`` for JSON requests). Every answer has
CORS headers allowing any origin, and any ``OPTIONS`` request gets 200, so a browser page can call the
endpoints. Watched queries are not available over HTTP (use gRPC `WatchQuery`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

import grpc
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from exocommon.auth_token import ForeignCell, UnknownNode
from exocommon.client.registry import load_generated_modules
from exocommon.errors import ExocoreError, ResourceExhausted, Unauthenticated, Unavailable
from exocore.store import mutation_pb2, query_pb2
from exogateway.auth import Authenticator, bearer_token
from exogateway.grpc_service import CALL_TIMEOUT_S, MUTATE, QUERY
from exogateway.limits import Limits, RequestTooLarge
from exogateway.routing import Router, StoreStatusError

__all__ = ["CORS_HEADERS", "create_http_app"]

log = logging.getLogger(__name__)

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, PUT, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, Accept, Origin, X-Requested-With",
    "Access-Control-Max-Age": "86400",
}

PROTOBUF_CONTENT_TYPE = "application/protobuf"
JSON_CONTENT_TYPE = "application/json"

# Store statuses that mean "your request is wrong" (the original answered 400 to any store error).
_CLIENT_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)

_ENDPOINTS: dict[str, tuple[str, type[Message], type[Message]]] = {
    "/store/query": (QUERY, query_pb2.EntityQuery, query_pb2.EntityResults),
    "/store/mutate": (MUTATE, mutation_pb2.MutationRequest, mutation_pb2.MutationResult),
}


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _is_json(request: web.Request) -> bool:
    return request.content_type == JSON_CONTENT_TYPE


def _error_response(status: int, message: str, as_json: bool) -> web.Response:
    if as_json:
        return web.Response(status=status, text=json.dumps({"error": message}), content_type=JSON_CONTENT_TYPE)
    return web.Response(status=status, text=message + "\n", content_type="text/plain")


def _status_of_auth_error(exc: Unauthenticated) -> int:
    # The original answers 404 when it has no store for the token's cell, or the node is not in it.
    return 404 if isinstance(exc, ForeignCell | UnknownNode) else 401


def _status_of_store_error(code: grpc.StatusCode) -> int:
    if code in _CLIENT_ERROR_CODES:
        return 400
    if code == grpc.StatusCode.UNAVAILABLE:
        return 503
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return 429
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return 401
    return 500


@web.middleware
async def cors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """CORS headers on every answer (errors included); any OPTIONS (a preflight) is answered 200."""
    if request.method == "OPTIONS":
        response: web.StreamResponse = web.Response(status=200)
    else:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status == 413:
                response = _error_response(413, f"request body too large: {exc.text}", _is_json(request))
            else:
                response = web.Response(status=exc.status, text=exc.text or exc.reason, content_type="text/plain")
    for key, value in CORS_HEADERS.items():
        response.headers.setdefault(key, value)
    requested = request.headers.get("Access-Control-Request-Headers")
    if request.method == "OPTIONS" and requested:
        response.headers["Access-Control-Allow-Headers"] = requested
    return response


def create_http_app(
    authenticator: Authenticator,
    router: Router,
    limits: Limits,
    call_timeout_s: float = CALL_TIMEOUT_S,
) -> web.Application:
    """The aiohttp application of the endpoints (see module docstring)."""
    load_generated_modules()  # every generated type in the default pool: JSON `Any` resolution
    # aiohttp refuses larger bodies itself with 413; the limit check below gives the same answer.
    app = web.Application(client_max_size=limits.settings.request_bytes_max, middlewares=[cors_middleware])

    async def handle(request: web.Request) -> web.Response:
        method, request_type, response_type = _ENDPOINTS[request.path]
        as_json = _is_json(request)
        try:
            return await _handle(request, method, request_type, response_type, as_json)
        except HttpError as exc:
            return _error_response(exc.status, exc.message, as_json)

    async def _handle(
        request: web.Request, method: str, request_type: type[Message], response_type: type[Message], as_json: bool
    ) -> web.Response:
        try:
            token = request.query.get("token") or bearer_token(request.headers.get("Authorization"))
            identity = authenticator.authenticate(token)
        except Unauthenticated as exc:
            raise HttpError(_status_of_auth_error(exc), str(exc)) from None
        body = await request.read()
        try:
            limits.check_request_size(len(body))
        except RequestTooLarge as exc:
            raise HttpError(413, str(exc)) from None
        payload = _decode_body(body, request_type, as_json)
        try:
            with limits.call(identity.token):
                answer = await router.unary(method, payload, call_timeout_s)
        except StoreStatusError as exc:
            raise HttpError(_status_of_store_error(exc.code), exc.details) from None
        except Unavailable as exc:
            raise HttpError(503, str(exc)) from None
        except ResourceExhausted as exc:
            raise HttpError(429, str(exc)) from None
        except ExocoreError as exc:
            raise HttpError(500, str(exc)) from None
        if not as_json:
            return web.Response(body=answer, content_type=PROTOBUF_CONTENT_TYPE)
        message = response_type.FromString(answer)
        return web.Response(text=json_format.MessageToJson(message, indent=None), content_type=JSON_CONTENT_TYPE)

    for path in _ENDPOINTS:
        app.router.add_route("*", path, handle)
    return app


def _decode_body(body: bytes, request_type: type[Message], as_json: bool) -> bytes:
    """The request as protobuf bytes; HttpError 400 when it does not decode."""
    name = request_type.DESCRIPTOR.full_name
    if as_json:
        message = request_type()
        try:
            json_format.Parse(body.decode("utf-8") if body else "{}", message)
        except (json_format.ParseError, UnicodeDecodeError, TypeError, ValueError) as exc:
            raise HttpError(400, f"body is not a JSON {name}: {exc}") from None
        return message.SerializeToString()
    try:
        request_type.FromString(body)
    except DecodeError as exc:
        raise HttpError(400, f"body is not an encoded {name}: {exc}") from None
    return body
