"""Relaying an instance's answer to the router's client: errors as OpenAI error objects, SSE
streams chunk by chunk as they arrive (never buffered to the end)."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
from aiohttp import web

from server.protocol import ApiError, error_body
from server.router.state import Instance, describe_error

log = logging.getLogger("cara_router")
# Failures before any byte of an answer: the instance is unreachable, try another one.
UNREACHABLE = (
    aiohttp.ClientOSError,
    aiohttp.ConnectionTimeoutError,
    aiohttp.ServerDisconnectedError,
)
PASS_HEADERS = (
    "Content-Type",
    "Retry-After",
    "WWW-Authenticate",
    "Cache-Control",
    "X-Accel-Buffering",
)


def _gateway_timeout(inst: Instance) -> ApiError:
    return ApiError(
        504,
        f"instance {inst.url} did not answer in time",
        type="server_error",
        code="upstream_timeout",
    )


def _is_error_body(data: bytes) -> bool:
    try:
        doc = json.loads(data)
    except ValueError:
        return False
    return isinstance(doc, dict) and isinstance(doc.get("error"), dict)


async def _relay_stream(
    request: web.Request, up: aiohttp.ClientResponse, headers: dict[str, str], inst: Instance
) -> web.StreamResponse:
    """Relay an SSE stream as its bytes arrive (never buffered to the end)."""
    resp = web.StreamResponse(status=up.status, headers=headers)
    await resp.prepare(request)
    while True:
        try:
            data = await up.content.readany()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:  # the instance failed
            log.warning("stream from %s broke: %s", inst.url, describe_error(e))
            msg = f"instance {inst.url} failed mid-stream: {describe_error(e)}"
            event = json.dumps(error_body(msg, "server_error", code="upstream_error"))
            try:
                await resp.write(f"data: {event}\n\ndata: [DONE]\n\n".encode())
            except (ConnectionError, aiohttp.ClientError):
                pass
            return resp
        if not data:
            break
        try:
            await resp.write(data)
        except (ConnectionError, aiohttp.ClientError):  # the client went away
            log.debug("client of a stream from %s disconnected", inst.url)
            up.close()  # the instance sees the disconnect and cancels the sequence
            return resp
    await resp.write_eof()
    return resp
