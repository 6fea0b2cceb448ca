"""The OpenAI protocol pieces the server, the router and the fleet share: the error object,
reading a JSON body, the API key check. Validated by hand (no schema library at runtime).

Every refusal is an ``ApiError`` that the app renders as OpenAI's error object
``{"error": {"message", "type", "param", "code"}}``, so clients get the same exceptions they get
from OpenAI or vLLM. Requests are parsed in ``server/instance/request_parsing.py`` (completions and chat,
with vLLM's sampling extras), responses shaped in ``server/instance/response_shapes.py``.
"""

from __future__ import annotations

import hmac
import json


class ApiError(Exception):
    """A request the server refuses; rendered as OpenAI's error object with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def not_found_model(name: str) -> ApiError:
    return ApiError(
        404,
        f"The model `{name}` does not exist.",
        param="model",
        code="model_not_found",
    )


def read_json_object(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", code="invalid_json")
    try:  # "\ud800" is valid JSON but no text: the tokenizer and the response would choke
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad("the request contains an unpaired UTF-16 surrogate", code="invalid_json") from e
    return body


def check_api_key(path: str, authorization: str, key: str | None) -> None:
    """With an API key set, /v1/* needs ``Authorization: Bearer <key>`` (401 otherwise);
    /health, /metrics and /openapi.json stay open, as in vLLM."""
    if key and path.startswith("/v1/"):
        if not hmac.compare_digest(authorization.encode(), f"Bearer {key}".encode()):
            raise ApiError(
                401,
                "invalid or missing API key: send `Authorization: Bearer <key>`",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )


def package_version() -> str:
    """This package's version (/version on cara-serve and cara-router, as vLLM's)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cara-jax")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"
