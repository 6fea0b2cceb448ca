"""vLLM's /tokenize and /detokenize: the server's own tokenizer and chat template, so a client
counts and builds prompts exactly as the engine will see them.

POST /tokenize   {"prompt": str, "add_special_tokens": true}  or
                 {"messages": [...], "add_generation_prompt": true, "tools": [...],
                  "chat_template_kwargs": {...}}  (rendered as the chat route renders them)
              -> {"count", "max_model_len", "tokens", "token_strs"}
POST /detokenize {"tokens": [int, ...]} -> {"prompt": str}
(``model`` is accepted and checked like the generation routes' and does not change the
tokenizer: adapters share the base model's.)
"""

from __future__ import annotations

from aiohttp import web

from server.instance.request_parsing import chat_prompt
from server.instance.state import STATE
from server.protocol import bad, read_json_object


async def _model(state, body: dict) -> None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("`model` must be a string", "model")
    await state.adapters.resolve_model(model)  # 404 for a name this server does not serve


async def tokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = read_json_object(await request.read())
    await _model(state, body)
    tok = state.tokenizer
    if "messages" in body:
        ids, _ = chat_prompt(body, tok, state.config.tool_call_parser)
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise bad("`prompt` (a string) or `messages` is required", "prompt")
        special = body.get("add_special_tokens", True)
        if not isinstance(special, bool):
            raise bad("`add_special_tokens` must be a boolean", "add_special_tokens")
        ids = tok.encode(prompt, add_special_tokens=special)
    strs = None
    if body.get("return_token_strs"):
        strs = [tok.decode([i], skip_special_tokens=False) for i in ids]
    return web.json_response({"count": len(ids), "max_model_len": state.max_len,
                              "tokens": ids, "token_strs": strs})  # fmt: skip


async def detokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = read_json_object(await request.read())
    await _model(state, body)
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in ids
    ):
        raise bad("`tokens` must be an array of integers", "tokens")
    if any(not 0 <= t < state.vocab for t in ids):
        raise bad("a token id is outside the vocabulary", "tokens")
    return web.json_response({"prompt": state.tokenizer.decode(ids)})


def add_tokenize_routes(app: web.Application) -> None:
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
