"""OpenAI-compatible request parsing and response bodies for ``/v1/completions`` and ``/v1/chat/completions``.

Parsing turns a JSON body into (prompt token ids, ``SamplingParams``, streaming options) or raises
``ApiError`` (HTTP 400 with OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``).

Accepted fields (OpenAI's names and defaults; the rest of OpenAI's fields are refused when set to
anything but their neutral value, so a client never silently gets something else than it asked):

=====================  =================================================================
``prompt``             completions: a string, or a list of token ids (one prompt only)
``messages``           chat: ``[{"role": ..., "content": "text"}, ...]`` (the chat template)
``max_tokens``         new tokens (completions default 16; chat default: up to the context);
                       ``max_completion_tokens`` is the chat alias
``temperature``        default 1.0; 0 = greedy
``top_p``              default 1.0
``seed``               default: a fresh random seed per request
``stop``               a string or a list of strings
``stream``             server-sent events, ending with ``data: [DONE]``;
                       ``stream_options.include_usage`` adds a last chunk with the usage
``n``                  1 only
``top_k``              (extension) default 0 = off
``stop_token_ids``     (extension) list of token ids that end generation
``ignore_eos``         (extension) do not stop at the model's end-of-sequence token
=====================  =================================================================

Each choice also carries ``token_ids`` (extension): the generated token ids.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any, Optional

from megacore.inference.chat import ChatTemplateError
from megacore.inference.engine import SamplingParams

_NEUTRAL = {"logprobs": (None, False, 0), "echo": (None, False), "best_of": (None, 1), "suffix": (None, ""),
            "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
            "top_logprobs": (None, 0), "tools": (None, []), "response_format": (None, {"type": "text"})}


class ApiError(Exception):
    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass
class ServeContext:
    """What parsing needs to know about the served model."""
    model_name: str
    max_length: int
    vocab_size: int
    tokenizer: Any = None
    chat_template: Any = None


@dataclass
class Parsed:
    prompt_ids: list
    params: SamplingParams
    stream: bool
    include_usage: bool


def _number(body: dict, key: str, default, kind=float, low=None, high=None, low_open=False):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ApiError(f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {value!r}", key)
    if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
        bounds = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise ApiError(f"'{key}' must be {bounds}, got {value!r}", key)
    return kind(value)


def _common(body: dict, ctx: ServeContext, prompt_ids: list, default_max: Optional[int]) -> Parsed:
    for key, neutral in _NEUTRAL.items():
        if key in body and body[key] not in neutral:
            raise ApiError(f"'{key}' is not supported by this server; leave it out", key)
    n = _number(body, "n", 1, int)
    if n != 1:
        raise ApiError(f"'n' must be 1 (one choice per request), got {n}; send {n} requests instead", "n")
    if len(prompt_ids) >= ctx.max_length:
        raise ApiError(f"the prompt has {len(prompt_ids)} tokens but the model's context is {ctx.max_length} tokens "
                       f"(prompt + completion); shorten the prompt to at most {ctx.max_length - 1} tokens", "prompt")
    room = ctx.max_length - len(prompt_ids)
    max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_new = _number(body, max_key, default_max if default_max is not None else room, int, low=1)
    if max_new > room:
        raise ApiError(f"'{max_key}'={max_new} plus the prompt's {len(prompt_ids)} tokens exceeds the model's context "
                       f"of {ctx.max_length} tokens; ask for at most {room}", max_key)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError("'stop' must be a string or a list of strings", "stop")
    stop = [s for s in stop if s]
    if stop and ctx.tokenizer is None:
        raise ApiError("'stop' strings need a tokenizer and this model is served without one; use 'stop_token_ids'",
                       "stop")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < ctx.vocab_size
                                                 for t in stop_ids):
        raise ApiError(f"'stop_token_ids' must be a list of token ids in [0, {ctx.vocab_size})", "stop_token_ids")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbits(31)
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise ApiError(f"'seed' must be an integer, got {seed!r}", "seed")
    ignore_eos = body.get("ignore_eos", False)
    stream = body.get("stream", False)
    for key, value in (("ignore_eos", ignore_eos), ("stream", stream)):
        if not isinstance(value, bool):
            raise ApiError(f"'{key}' must be true or false, got {value!r}", key)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError("'stream_options' must be an object", "stream_options")
    params = SamplingParams(
        max_new_tokens=max_new,
        temperature=_number(body, "temperature", 1.0, float, low=0, high=100),
        top_k=_number(body, "top_k", 0, int, low=0),
        top_p=_number(body, "top_p", 1.0, float, low=0, high=1, low_open=True),
        seed=seed, stop=tuple(stop), stop_token_ids=tuple(stop_ids), ignore_eos=ignore_eos)
    return Parsed(prompt_ids, params, stream, bool(options.get("include_usage", False)))


def parse_completion(body: Any, ctx: ServeContext) -> Parsed:
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    if "prompt" not in body:
        raise ApiError("'prompt' is required: a string, or a list of token ids", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if ctx.tokenizer is None:
            raise ApiError("this model is served without a tokenizer: send 'prompt' as a list of token ids", "prompt")
        ids = ctx.tokenizer.encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < ctx.vocab_size]
        if bad:
            raise ApiError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {ctx.vocab_size})", "prompt")
    elif isinstance(prompt, list):
        raise ApiError("'prompt' must be one string or one list of token ids (several prompts: send one request each)",
                       "prompt")
    else:
        raise ApiError(f"'prompt' must be a string or a list of token ids, got {type(prompt).__name__}", "prompt")
    if not ids:
        raise ApiError("'prompt' is empty", "prompt")
    return _common(body, ctx, ids, default_max=16)


def parse_chat(body: Any, ctx: ServeContext) -> Parsed:
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("'messages' is required: a non-empty list of {\"role\": ..., \"content\": ...}", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ApiError(f"messages[{i}] must be an object with a string 'role' and a string 'content'", "messages")
    if ctx.tokenizer is None:
        raise ApiError("chat completions need a tokenizer and this model is served without one; use /v1/completions "
                       "with token ids", "messages")
    try:
        text = ctx.chat_template.render(messages)
    except ChatTemplateError as e:
        raise ApiError(str(e), "messages") from None
    ids = ctx.tokenizer.encode(text)
    if not ids:
        raise ApiError("the messages render to an empty prompt", "messages")
    return _common(body, ctx, ids, default_max=None)


# ------------------------------------------------------------------------------ responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, text: str, token_ids: list, finish: Optional[str], chat: bool,
                    use: Optional[dict] = None, chunk: bool = False, first: bool = False) -> dict:
    """A whole response (``chunk=False``) or one streamed chunk, for either endpoint."""
    if chat:
        if chunk:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "token_ids": token_ids}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                      "token_ids": token_ids}
        kind = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "token_ids": token_ids}
        kind = "text_completion"
    body = {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": [choice]}
    if use is not None:
        body["usage"] = use
    return body
