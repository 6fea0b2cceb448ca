"""OpenAPI 3.1 description of the server (served at GET /openapi.json).

Written by hand to match the handlers: request fields with the ranges the server enforces,
responses with OpenAI's shapes, and every error status with the error object.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cara_jax.sampling_params import MAX_LOGPROBS
from server.protocol import MAX_N

if TYPE_CHECKING:
    from server.state import AppState

REF = "#/components/schemas/"


def _ref(name: str) -> dict:
    return {"$ref": REF + name}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


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


def _sampling_fields() -> dict[str, Any]:
    num = {"type": "number"}
    return {
        "temperature": _nullable({**num, "minimum": 0, "default": 1}),
        "top_p": _nullable({**num, "exclusiveMinimum": 0, "maximum": 1, "default": 1}),
        "top_k": _nullable({"type": "integer", "minimum": -1, "description": "0 or -1: off"}),
        "min_p": _nullable({**num, "minimum": 0, "maximum": 1}),
        "presence_penalty": _nullable({**num, "minimum": -2, "maximum": 2}),
        "frequency_penalty": _nullable({**num, "minimum": -2, "maximum": 2}),
        "repetition_penalty": _nullable({**num, "exclusiveMinimum": 0, "maximum": 10}),
        "seed": _nullable({"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}),
        "stop": _nullable(
            {
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "string"}, "maxItems": 16},
                ]
            }
        ),
        "stop_token_ids": _nullable({"type": "array", "items": {"type": "integer"}}),
        "ignore_eos": _nullable({"type": "boolean"}),
        "tpot_slo": _nullable(
            {
                **num,
                "exclusiveMinimum": 0,
                "description": "cara-jax: this request's time-per-output-token SLO in seconds",
            }
        ),
        "n": _nullable({"type": "integer", "minimum": 1, "maximum": MAX_N}),
        "stream": _nullable({"type": "boolean"}),
        "stream_options": _nullable(
            {
                "type": "object",
                "properties": {"include_usage": {"type": "boolean"}},
            }
        ),
        "logit_bias": _nullable(
            {"type": "object", "maxProperties": 0, "description": "not supported: must be empty"}
        ),
        "user": _nullable({"type": "string"}),
    }


def _schemas(max_len: int) -> dict[str, Any]:
    usage = {
        "type": "object",
        "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {
            k: {"type": "integer", "minimum": 0}
            for k in ("prompt_tokens", "completion_tokens", "total_tokens")
        },
    }
    finish = _nullable({"type": "string", "enum": ["stop", "length", "error", "abort"]})
    max_tokens = _nullable(
        {
            "type": "integer",
            "minimum": 1,
            "maximum": max_len,
            "description": "new tokens; prompt + max_tokens must fit the context (else 400)",
        }
    )
    completion_lp = _nullable(
        {
            "type": "object",
            "properties": {
                "tokens": {"type": "array", "items": {"type": "string"}},
                "token_logprobs": {"type": "array", "items": {"type": "number"}},
                "top_logprobs": {
                    "type": "array",
                    "items": {"type": "object", "additionalProperties": {"type": "number"}},
                },
                "text_offset": {"type": "array", "items": {"type": "integer"}},
            },
        }
    )
    top_entry = {
        "type": "object",
        "required": ["token", "logprob"],
        "properties": {
            "token": {"type": "string"},
            "logprob": {"type": "number"},
            "bytes": {"type": "array", "items": {"type": "integer"}},
        },
    }
    chat_lp = _nullable(
        {
            "type": "object",
            "properties": {
                "content": {
                    "type": "array",
                    "items": {
                        **top_entry,
                        "properties": {
                            **top_entry["properties"],
                            "top_logprobs": {"type": "array", "items": top_entry},
                        },
                    },
                }
            },
        }
    )
    model_card = {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "const": "model"},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
            "root": _nullable({"type": "string"}),
            "parent": _nullable({"type": "string"}),
            "max_model_len": {"type": "integer"},
            "rank": {"type": "integer", "description": "adapters: largest LoRA rank"},
        },
    }
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": _nullable({"type": "string"}),
                        "code": _nullable({"type": ["string", "integer"]}),
                    },
                }
            },
        },
        "Usage": usage,
        "CompletionRequest": {
            "type": "object",
            "required": ["model", "prompt"],  # as OpenAI; the server defaults to the base
            "properties": {
                "model": {
                    "type": "string",
                    "description": "the base model's served name or "
                    "an adapter's name (default: the base model)",
                },
                "prompt": {
                    "anyOf": [
                        {"type": "string"},
                        {"type": "array", "items": {"type": "string"}, "minItems": 1},
                        {"type": "array", "items": {"type": "integer"}, "minItems": 1},
                        {
                            "type": "array",
                            "items": {"type": "array", "items": {"type": "integer"}},
                            "minItems": 1,
                        },
                    ]
                },
                "max_tokens": max_tokens,
                "logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS}),
                "echo": _nullable({"type": "boolean"}),
                "suffix": _nullable(
                    {"type": "string", "maxLength": 0, "description": "not supported"}
                ),
                "best_of": _nullable(
                    {"type": "integer", "minimum": 1, "description": "must equal n"}
                ),
                **_sampling_fields(),
            },
            "example": {
                "model": "MODEL",
                "prompt": "The capital of France is",
                "max_tokens": 4,
                "temperature": 0,
            },
        },
        "Completion": {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices"],
            "properties": {
                "id": {"type": "string"},
                "object": {"type": "string", "const": "text_completion"},
                "created": {"type": "integer"},
                "model": {"type": "string"},
                "choices": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["index", "text", "finish_reason"],
                        "properties": {
                            "index": {"type": "integer"},
                            "text": {"type": "string"},
                            "logprobs": completion_lp,
                            "finish_reason": finish,
                        },
                    },
                },
                "usage": _ref("Usage"),
            },
        },
        "ChatMessage": {
            "type": "object",
            "required": ["role"],
            "properties": {
                "role": {
                    "type": "string",
                    "enum": ["system", "developer", "user", "assistant", "tool"],
                },
                "content": _nullable(
                    {
                        "anyOf": [
                            {"type": "string"},
                            {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["type", "text"],
                                    "properties": {
                                        "type": {"const": "text"},
                                        "text": {"type": "string"},
                                    },
                                },
                            },
                        ]
                    }
                ),
                "name": {"type": "string"},
            },
        },
        "ChatCompletionRequest": {
            "type": "object",
            "required": ["model", "messages"],
            "properties": {
                "model": {"type": "string"},
                "messages": {"type": "array", "items": _ref("ChatMessage"), "minItems": 1},
                "max_tokens": max_tokens,
                "max_completion_tokens": max_tokens,
                "logprobs": _nullable({"type": "boolean"}),
                "top_logprobs": _nullable(
                    {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS}
                ),
                "tools": _nullable(
                    {"type": "array", "maxItems": 0, "description": "not supported"}
                ),
                "response_format": _nullable(
                    {"type": "object", "properties": {"type": {"const": "text"}}}
                ),
                "add_generation_prompt": _nullable({"type": "boolean"}),
                **_sampling_fields(),
            },
            "example": {
                "model": "MODEL",
                "max_tokens": 8,
                "temperature": 0,
                "messages": [{"role": "user", "content": "Hi!"}],
            },
        },
        "ChatCompletion": {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices"],
            "properties": {
                "id": {"type": "string"},
                "object": {"type": "string", "const": "chat.completion"},
                "created": {"type": "integer"},
                "model": {"type": "string"},
                "choices": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["index", "message", "finish_reason"],
                        "properties": {
                            "index": {"type": "integer"},
                            "message": {
                                "type": "object",
                                "required": ["role", "content"],
                                "properties": {
                                    "role": {"const": "assistant"},
                                    "content": {"type": "string"},
                                },
                            },
                            "logprobs": chat_lp,
                            "finish_reason": finish,
                        },
                    },
                },
                "usage": _ref("Usage"),
            },
        },
        "Model": model_card,
        "ModelList": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {
                "object": {"const": "list"},
                "data": {"type": "array", "items": _ref("Model")},
            },
        },
        "LoadLoraRequest": {
            "type": "object",
            "required": ["lora_name", "lora_path"],
            "properties": {"lora_name": {"type": "string"}, "lora_path": {"type": "string"}},
            "example": {"lora_name": "my-adapter", "lora_path": "/path/to/peft-folder"},
        },
        "UnloadLoraRequest": {
            "type": "object",
            "required": ["lora_name"],
            "properties": {"lora_name": {"type": "string"}},
            "example": {"lora_name": "my-adapter"},
        },
        "LoraAdapter": {
            "type": "object",
            "required": ["id", "message"],
            "properties": {
                "object": {"const": "lora_adapter"},
                "id": {"type": "string"},
                "root": {"type": "string"},
                "parent": {"type": "string"},
                "rank": {"type": "integer"},
                "content_hash": {"type": "string"},
                "message": {"type": "string"},
            },
        },
        "Health": {
            "type": "object",
            "required": ["status"],
            "properties": {
                "status": {"type": "string"},
                "running": {"type": "integer"},
                "waiting": {"type": "integer"},
            },
        },
    }


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
            "/health": {
                "get": {
                    "summary": "Liveness: 200 while serving, 503 while draining or broken",
                    "responses": {
                        "200": {"description": "Serving", "content": _json(_ref("Health"))},
                        "503": {"description": "Not serving", "content": _json(_ref("Health"))},
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
