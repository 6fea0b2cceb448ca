"""OpenAPI 3.1 description of the server (served at GET /openapi.json).

Written by hand to match the handlers: request fields with the ranges the server enforces,
responses with OpenAI's shapes, and every error status with the error object. The component
schemas (request and response bodies) are in ``server/instance/openapi_schemas.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from server.instance.openapi_schemas import _json, _ref, _schemas

if TYPE_CHECKING:
    from server.instance.state import AppState


def _errors(*codes: int) -> dict:
    why = {
        400: "Invalid JSON, fields or values; prompt too long; adapter refused",
        401: "Missing or wrong API key (only with --api-key)",
        403: "Runtime adapter changes disabled (no --lora-dir, no --allow-runtime-lora)",
        404: "Unknown model or adapter",
        413: "Request body too large",
        429: "Queue full; see Retry-After",
        500: "Internal error (logged by the server)",
        503: "Shutting down",
    }
    out = {str(c): {"description": why[c], "content": _json(_ref("Error"))} for c in codes}
    out["default"] = {"description": "Any other error", "content": _json(_ref("Error"))}
    return out


def _generation_op(summary: str, req: str, resp: str, chunk_doc: str) -> dict:
    return {
        "summary": summary,
        "requestBody": {"required": True, "content": _json(_ref(req))},
        "responses": {
            "200": {
                "description": f"The whole answer, or with `stream: true` Server-Sent Events: "
                f"`data: {{{chunk_doc}}}` chunks, a usage chunk with "
                "`stream_options.include_usage`, then `data: [DONE]`",
                "content": {
                    **_json(_ref(resp)),
                    "text/event-stream": {"schema": {"type": "string"}},
                },
            },
            **_errors(400, 401, 404, 413, 429, 500, 503),
        },
    }


def openapi_spec(state: AppState) -> dict:
    schemas = _schemas(state.max_len)
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        schemas[name]["example"]["model"] = state.base_name
    spec: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "cara-jax",
            "version": "0.1.0",
            "description": "OpenAI-compatible multi-LoRA inference server. `model` names the "
            f"base model ({', '.join(state.config.served_names)}) or a loaded adapter.",
        },
        "paths": {
            "/v1/completions": {
                "post": _generation_op(
                    "Text completion", "CompletionRequest", "Completion", "text_completion chunk"
                )
            },
            "/v1/chat/completions": {
                "post": _generation_op(
                    "Chat completion",
                    "ChatCompletionRequest",
                    "ChatCompletion",
                    "chat.completion.chunk",
                )
            },
            "/v1/models": {
                "get": {
                    "summary": "The base model and every loaded adapter (`parent`, `root`)",
                    "responses": {
                        "200": {"description": "Models", "content": _json(_ref("ModelList"))},
                        **_errors(401),
                    },
                }
            },
            "/v1/models/{model}": {
                "get": {
                    "summary": "One model or adapter",
                    "parameters": [
                        {
                            "name": "model",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": {"description": "Model", "content": _json(_ref("Model"))},
                        **_errors(401, 404),
                    },
                }
            },
            "/v1/load_lora_adapter": {
                "post": {
                    "summary": "Load (or reload) a PEFT adapter under a name (vLLM's body)",
                    "requestBody": {"required": True, "content": _json(_ref("LoadLoraRequest"))},
                    "responses": {
                        "200": {"description": "Loaded", "content": _json(_ref("LoraAdapter"))},
                        **_errors(400, 401, 403, 404, 500),
                    },
                }
            },
            "/v1/unload_lora_adapter": {
                "post": {
                    "summary": "Unload an adapter by name (vLLM's body)",
                    "requestBody": {"required": True, "content": _json(_ref("UnloadLoraRequest"))},
                    "responses": {
                        "200": {"description": "Unloaded", "content": _json(_ref("LoraAdapter"))},
                        **_errors(400, 401, 403, 404),
                    },
                }
            },
            "/tokenize": {
                "post": {
                    "summary": "Token ids of a prompt or of chat messages through the chat "
                    "template (vLLM's body)",
                    "requestBody": {
                        "required": True,
                        "content": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "model": {"type": "string"},
                                    "prompt": {"type": "string"},
                                    "add_special_tokens": {"type": "boolean"},
                                    "messages": {
                                        "type": "array",
                                        "items": _ref("ChatMessage"),
                                        "minItems": 1,
                                    },
                                    "add_generation_prompt": {"type": "boolean"},
                                    "return_token_strs": {"type": "boolean"},
                                },
                            }
                        ),
                    },
                    "responses": {
                        "200": {
                            "description": "Tokens",
                            "content": _json(
                                {
                                    "type": "object",
                                    "required": ["count", "max_model_len", "tokens"],
                                    "properties": {
                                        "count": {"type": "integer"},
                                        "max_model_len": {"type": "integer"},
                                        "tokens": {"type": "array", "items": {"type": "integer"}},
                                        "token_strs": {
                                            "type": ["array", "null"],
                                            "items": {"type": "string"},
                                        },
                                    },
                                }
                            ),
                        },
                        **_errors(400, 401, 404),
                    },
                }
            },
            "/detokenize": {
                "post": {
                    "summary": "Text of token ids (vLLM's body)",
                    "requestBody": {
                        "required": True,
                        "content": _json(
                            {
                                "type": "object",
                                "required": ["tokens"],
                                "properties": {
                                    "model": {"type": "string"},
                                    "tokens": {"type": "array", "items": {"type": "integer"}},
                                },
                            }
                        ),
                    },
                    "responses": {
                        "200": {
                            "description": "Text",
                            "content": _json(
                                {
                                    "type": "object",
                                    "required": ["prompt"],
                                    "properties": {"prompt": {"type": "string"}},
                                }
                            ),
                        },
                        **_errors(400, 401, 404),
                    },
                }
            },
            "/health": {
                "get": {
                    "summary": "Liveness: 200 while serving, 503 while draining or broken",
                    "responses": {
                        "200": {"description": "Serving", "content": _json(_ref("Health"))},
                        "503": {"description": "Not serving", "content": _json(_ref("Health"))},
                    },
                }
            },
            "/version": {
                "get": {
                    "summary": "The server's version (vLLM's /version)",
                    "responses": {
                        "200": {
                            "description": "Version",
                            "content": _json(
                                {
                                    "type": "object",
                                    "required": ["version"],
                                    "properties": {"version": {"type": "string"}},
                                }
                            ),
                        },
                    },
                }
            },
            "/v1/scheduler/state": {
                "get": {
                    "summary": "Running and queued requests with LoRA ranks and SLOs, the cost "
                    "model and the adapters served: what a rank-aware router reads",
                    "responses": {
                        "200": {
                            "description": "Scheduler state",
                            "content": _json({"type": "object"}),
                        },
                        **_errors(401),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (text exposition format)",
                    "responses": {
                        "200": {
                            "description": "Metrics",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {
                        "200": {"description": "OpenAPI", "content": _json({"type": "object"})}
                    },
                }
            },
        },
        "components": {"schemas": schemas},
    }
    if state.config.api_key:
        spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, ops in spec["paths"].items():
            if path.startswith("/v1/"):
                for op in ops.values():
                    op["security"] = [{"bearer": []}]
    return spec
