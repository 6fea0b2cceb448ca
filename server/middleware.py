"""The middlewares every aiohttp app of the package uses (cara-serve, cara-router): every
failure becomes OpenAI's error object and is counted by endpoint and status; ``--api-key``
guards /v1/*; a request's ``X-Request-Id`` is echoed on its answer (``echo_request_id``);
``--allowed-origins`` lets browsers on those origins call the API (``cors``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiohttp import web

from server.protocol import ApiError, check_api_key, error_body

log = logging.getLogger(__name__)

# counts one answer: (request, endpoint label, status label)
Count = Callable[[web.Request, str, str], None]


def endpoint_label(request: web.Request) -> str:
    """The route's pattern; "unmatched" for paths without one (random paths must not become
    label values)."""
    route = request.match_info.route
    if route.resource is None or request.match_info.http_exception is not None:
        return "unmatched"
    return route.resource.canonical


def error_middleware(count: Count, internal_message: str = "internal server error"):
    """Turn ApiError, HTTP exceptions and unexpected failures into OpenAI error answers;
    a client that goes away is counted as 499."""

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        endpoint = endpoint_label(request)
        try:
            resp = await handler(request)
        except ApiError as e:
            resp = web.json_response(e.body(), status=e.status, headers=e.headers)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            kind = "invalid_request_error" if e.status < 500 else "server_error"
            msg = f"no route {request.method} {request.path}" if e.status == 404 else e.reason
            headers = {k: v for k, v in e.headers.items() if k in ("Allow", "Retry-After")}
            resp = web.json_response(
                error_body(msg or "error", kind, code=str(e.status)),
                status=e.status,
                headers=headers,
            )
        except asyncio.CancelledError:
            count(request, endpoint, "499")  # the client went away
            raise
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            resp = web.json_response(
                error_body(
                    f"{internal_message} (logged on the server)",
                    "server_error",
                    code="internal_error",
                ),
                status=500,
            )
        count(request, endpoint, str(resp.status))
        return resp

    return middleware


def auth_middleware(key_of: Callable[[web.Request], str | None]):
    """With an API key, /v1/* needs it; /health, /metrics and /openapi.json stay open, as in
    vLLM."""

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        check_api_key(request.path, request.headers.get("Authorization", ""), key_of(request))
        return await handler(request)

    return middleware


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare`` hook: a client's X-Request-Id comes back on the answer, streamed
    or not, errors included (as vLLM's request-id headers do), so logs on both sides join."""
    rid = request.headers.get("X-Request-Id")
    if rid and "X-Request-Id" not in response.headers:
        response.headers["X-Request-Id"] = rid[:256]


def origin_allowed(origins: tuple[str, ...], origin: str | None) -> bool:
    return bool(origin) and ("*" in origins or origin in origins)


def cors_middleware(origins_of: Callable[[web.Request], tuple[str, ...]]):
    """Answer a browser's CORS preflight (OPTIONS with Access-Control-Request-Method) from an
    allowed origin, before auth: a preflight carries no credentials. ``cors_headers`` adds
    the headers to the answers themselves."""

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if (
            request.method == "OPTIONS"
            and "Access-Control-Request-Method" in request.headers
            and origin_allowed(origins_of(request), origin)
        ):
            asked = request.headers.get("Access-Control-Request-Headers", "")
            return web.Response(status=204, headers={
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": asked or "Authorization, Content-Type",
                "Access-Control-Max-Age": "600",
            })  # fmt: skip
        return await handler(request)

    return middleware


def cors_headers(origins_of: Callable[[web.Request], tuple[str, ...]]):
    """``on_response_prepare`` hook: an allowed origin's answers (streamed ones included) carry
    Access-Control-Allow-Origin, and expose X-Request-Id to the page."""

    async def hook(request: web.Request, response: web.StreamResponse) -> None:
        origins = origins_of(request)
        origin = request.headers.get("Origin")
        if origins and "*" not in origins:  # the answer depends on the origin: caches must know
            response.headers.add("Vary", "Origin")
        if origin_allowed(origins, origin):
            response.headers["Access-Control-Allow-Origin"] = "*" if "*" in origins else origin
            response.headers["Access-Control-Expose-Headers"] = "X-Request-Id"

    return hook
