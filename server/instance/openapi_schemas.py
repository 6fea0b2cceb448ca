"""Component schemas of the OpenAPI description (``server/instance/openapi.py``): the request and
response bodies, with the ranges the server enforces and OpenAI's shapes.
"""

from __future__ import annotations

from typing import Any

from cara_jax.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS
from server.instance.request_parsing import MAX_N

REF = "#/components/schemas/"


def _ref(name: str) -> dict:
    return {"$ref": REF + name}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _structured_fields() -> dict[str, Any]:
    """Output constraints (one per request): server/instance/structured_parsing.py."""
    schema = {"type": "object", "description": "a JSON schema"}
    return {
        "response_format": _nullable(
            {
                "anyOf": [
                    {"type": "object", "required": ["type"],
                     "properties": {"type": {"enum": ["text", "json_object"]}}},
                    {"type": "object", "required": ["type", "json_schema"],
                     "properties": {
                         "type": {"const": "json_schema"},
                         "json_schema": {"type": "object", "properties": {
                             "name": {"type": "string"}, "schema": schema,
                             "strict": _nullable({"type": "boolean"})}},
                     }},
                ]
            }
        ),  # fmt: skip
        "structured_outputs": _nullable(
            {
                "type": "object",
                "description": "vLLM's: exactly one of json, regex, choice, grammar, json_object",
                "properties": {
                    "json": {"anyOf": [schema, {"type": "string"}]},
                    "regex": {"type": "string"},
                    "choice": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                    "grammar": {"type": "string", "description": "a Lark grammar"},
                    "json_object": {"type": "boolean"},
                },
            }
        ),
        "guided_json": _nullable({"anyOf": [schema, {"type": "string"}]}),
        "guided_regex": _nullable({"type": "string"}),
        "guided_choice": _nullable({"type": "array", "items": {"type": "string"}}),
        "guided_grammar": _nullable({"type": "string"}),
    }


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
        **_structured_fields(),
        "stream": _nullable({"type": "boolean"}),
        "stream_options": _nullable(
            {
                "type": "object",
                "properties": {
                    "include_usage": {"type": "boolean"},
                    "continuous_usage_stats": {
                        "type": "boolean",
                        "description": "vLLM's: usage (running counts) on every chunk",
                    },
                },
            }
        ),
        "skip_special_tokens": _nullable({"type": "boolean", "default": True}),
        "min_tokens": _nullable({"type": "integer", "minimum": 0, "default": 0}),
        "include_stop_str_in_output": _nullable({"type": "boolean", "default": False}),
        "prompt_logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS,
                                      "description": "vLLM's: per prompt token, its log-prob, "
                                      "rank and the top k (chat: not streamed)"}),
        "logit_bias": _nullable({"type": "object", "maxProperties": MAX_LOGIT_BIAS,
                                 "additionalProperties": {"type": "number", "minimum": -100,
                                                          "maximum": 100},
                                 "description": "token id -> bias added to its logit"}),  # fmt: skip
        "user": _nullable({"type": "string"}),
    }


def _tool_fields() -> dict[str, Any]:
    """Chat's tool-calling fields (server/instance/tool_calls.py)."""
    function = {"type": "object", "required": ["name"],
                "properties": {"name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                               "description": {"type": "string"},
                               "parameters": {"type": "object"}, "strict": {"type": "boolean"}}}
    named = {"type": "object", "required": ["type", "function"],
             "properties": {"type": {"const": "function"},
                            "function": {"type": "object", "required": ["name"],
                                         "properties": {"name": {"type": "string"}}}}}
    return {
        "tools": _nullable({"type": "array", "items": {
            "type": "object", "required": ["type", "function"],
            "properties": {"type": {"const": "function"}, "function": function}}}),
        "tool_choice": _nullable({"anyOf": [{"enum": ["none", "auto", "required"]}, named]}),
        "parallel_tool_calls": _nullable({"type": "boolean"}),
        "chat_template_kwargs": _nullable({"type": "object"}),
    }  # fmt: skip


def _schemas(max_len: int) -> dict[str, Any]:
    usage = {
        "type": "object",
        "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {
            k: {"type": "integer", "minimum": 0}
            for k in ("prompt_tokens", "completion_tokens", "total_tokens")
        },
    }
    finish = _nullable({"type": "string",
                        "enum": ["stop", "length", "tool_calls", "error", "abort"]})  # fmt: skip
    fn = {"type": "object", "required": ["name", "arguments"],
          "properties": {"name": {"type": "string"},
                         "arguments": {"type": "string", "description": "a JSON object, as text"}}}
    tool_call = {"type": "object", "required": ["id", "type", "function"],
                 "properties": {"id": {"type": "string"}, "type": {"const": "function"},
                                "function": fn}}  # fmt: skip
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
                "max_tokens": _nullable({**max_tokens["anyOf"][0], "minimum": 0,
                                         "description": "0 only with echo: score the prompt"}),
                "logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS}),
                "echo": _nullable({"type": "boolean",
                                   "description": "with logprobs: the prompt's log-probs too"}),
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
                "tool_calls": {"type": "array", "items": tool_call},  # assistant
                "tool_call_id": {"type": "string"},  # tool: the call it answers
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
                **_tool_fields(),
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
                                    "content": _nullable({"type": "string"}),
                                    "tool_calls": {"type": "array", "items": tool_call},
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
