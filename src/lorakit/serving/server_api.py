"""The OpenAI API's shapes for `lorakit serve`: its errors, request bodies checked into plain
dataclasses, and the bodies of responses and stream chunks.

Every check here answers a 400 that names the field (`param`) and says what to send instead;
nothing a client sends reaches the engine unchecked, so bad input never becomes a 500.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse

from .request import MAX_TOP_LOGPROBS

# OpenAI's error types, by status
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                405: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
                429: "rate_limit_error", 503: "server_error", 500: "server_error"}
MAX_STOPS = 4  # as OpenAI's API


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:  # noqa: A002 - OpenAI's name
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


async def read_json(request: HttpRequest, limit: int) -> dict:
    """The request's JSON object; 413 past ``limit`` bytes (checked while reading, not after)."""
    too_large = ApiError(413, f"the request body is over the server's limit of {limit} bytes (--max-body-bytes)",
                         code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object with "
                            f"Content-Type: application/json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got a JSON {type(body).__name__}")
    return body


# --- checking fields -----------------------------------------------------------------------------

def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def string(body: dict, name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{name} must be a non-empty string, got {_shown(value)}", param=name)
    return value


def _integer(body: dict, name: str, default: int | None, minimum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name} must be an integer, got {_shown(value)}", param=name)
    if minimum is not None and value < minimum:
        raise ApiError(400, f"{name} must be at least {minimum}, got {value}", param=name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{name} must be a number, got {_shown(value)}", param=name)
    if value > high or value < low or (low_open and value == low):
        span = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ApiError(400, f"{name} must be in {span}, got {value}", param=name)
    return float(value)


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, got {_shown(value)}", param=name)
    return value


def _stops(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them, "
                            f"got {_shown(value)}", param="stop")
    return stops


# Fields of OpenAI's API that lorakit does not do yet, with the values that mean "off" (accepted).
_NOT_YET = {
    "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""),
    "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "top_logprobs": (None, 0), "logprobs": (None, False),
}


def _refuse_unsupported(body: dict, names: tuple[str, ...]) -> None:
    for name in names:
        value = body.get(name)
        if not any(value == off and type(value) is type(off) for off in _NOT_YET[name]):
            hint = " (one choice per request: send n requests instead)" if name in ("n", "best_of") else ""
            raise ApiError(400, f"{name}={_shown(value)} is not supported by lorakit serve yet{hint}; leave it out",
                           param=name, code="unsupported_parameter")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise ApiError(400, "response_format other than {\"type\": \"text\"} is not supported by lorakit serve yet; "
                            "leave it out", param="response_format", code="unsupported_parameter")


# --- the requests --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Generation:
    """A checked /v1/completions or /v1/chat/completions body. ``prompt`` is a string or token ids
    (completions) or the chat messages (chat); ``max_tokens`` None: as many as the context leaves."""

    model: str
    prompt: Any
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    ignore_eos: bool
    chat: bool
    logprobs: int | None = None  # completions: the chosen token's log-probability and the top k
    id: str = field(default="")
    created: int = field(default_factory=lambda: int(time.time()))

    def engine_options(self) -> dict:
        """The keywords of `Engine.submit` (all but the prompt, the adapter and max_new_tokens)."""
        return dict(temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=self.stop or None,
                    ignore_eos=self.ignore_eos, logprobs=self.logprobs)


def _common(body: dict, *, chat: bool, prompt: Any, max_tokens: int | None) -> Generation:
    stream = _boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise ApiError(400, "stream_options must be an object, and only with stream=true", param="stream_options")
    include_usage = _boolean(options or {}, "include_usage", False)
    seed = _integer(body, "seed", None)
    if seed is not None and not -2**63 <= seed < 2**64:
        raise ApiError(400, f"seed must fit in 64 bits, got {seed}", param="seed")
    return Generation(model=string(body, "model"), prompt=prompt, max_tokens=max_tokens,
                      temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                      top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True), seed=seed, stop=_stops(body),
                      stream=stream, include_usage=include_usage, ignore_eos=_boolean(body, "ignore_eos", False),
                      chat=chat, id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}")


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def parse_completion(body: dict) -> Generation:
    """A /v1/completions body; ``prompt`` is one string or one list of token ids."""
    _refuse_unsupported(body, ("n", "best_of", "echo", "suffix", "frequency_penalty", "presence_penalty",
                               "logit_bias"))
    logprobs = _integer(body, "logprobs", None, minimum=0)
    if logprobs is not None and logprobs > MAX_TOP_LOGPROBS:
        raise ApiError(400, f"logprobs must be at most {MAX_TOP_LOGPROBS} (the most likely tokens reported beside "
                            f"each new one), got {logprobs}", param="logprobs")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and (isinstance(prompt[0], str) or _token_ids(prompt[0])):
        prompt = prompt[0]  # a batch of one
    if not (isinstance(prompt, str) or (_token_ids(prompt) and prompt)):
        raise ApiError(400, f"prompt must be one string or one non-empty list of token ids (one prompt per request; "
                            f"send several requests for several prompts), got {_shown(prompt)}", param="prompt")
    return replace(_common(body, chat=False, prompt=prompt, max_tokens=_integer(body, "max_tokens", 16, minimum=1)),
                   logprobs=logprobs)


_ROLES = ("system", "developer", "user", "assistant")


def parse_chat(body: dict) -> Generation:
    """A /v1/chat/completions body; ``prompt`` is the messages, each content a plain string."""
    _refuse_unsupported(body, ("n", "frequency_penalty", "presence_penalty", "logit_bias", "tools", "tool_choice",
                               "functions", "logprobs", "top_logprobs"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, f"messages must be a non-empty list of {{\"role\", \"content\"}} objects, "
                            f"got {_shown(messages)}", param="messages")
    plain = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in _ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {list(_ROLES)}, got {_shown(role)}",
                           param=f"messages[{i}].role")
        plain.append({"role": role, "content": _content(m.get("content"), i)})
    max_tokens = _integer(body, "max_completion_tokens", None, minimum=1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", None, minimum=1)
    return _common(body, chat=True, prompt=plain, max_tokens=max_tokens)


def _content(content: Any, i: int) -> str:
    """A message's text: a string, or a list of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                         for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts "
                        f"({{\"type\": \"text\", \"text\": ...}}; lorakit serves text models), got {_shown(content)}",
                   param=f"messages[{i}].content")


# --- the responses -------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(pieces: list[dict], offset: int = 0) -> dict:
    """OpenAI's completions ``logprobs`` object for ``pieces`` (token text, logprob, top), the
    first token at character ``offset`` of the completion (offsets add up the tokens' texts)."""
    offsets = []
    for piece in pieces:
        offsets.append(offset)
        offset += len(piece["token"])
    return {"tokens": [p["token"] for p in pieces], "token_logprobs": [p["logprob"] for p in pieces],
            "top_logprobs": [p["top"] for p in pieces], "text_offset": offsets}


def response_body(g: Generation, text: str, finish_reason: str, used: dict, pieces: list[dict] | None = None) -> dict:
    if g.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason,
                  "logprobs": completion_logprobs(pieces or []) if g.logprobs is not None else None}
    return {"id": g.id, "object": "chat.completion" if g.chat else "text_completion", "created": g.created,
            "model": g.model, "choices": [choice], "usage": used}


def chunk_body(g: Generation, text: str | None, finish_reason: str | None = None, used: dict | None = None,
               *, role: bool = False, logprobs: dict | None = None) -> dict:
    """One stream chunk; ``text`` None: a chunk without choices (the usage chunk of include_usage)."""
    choices = []
    if text is not None:
        if g.chat:
            delta = {"role": "assistant", "content": text} if role else {"content": text}
            choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        else:
            choices = [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]
    body = {"id": g.id, "object": "chat.completion.chunk" if g.chat else "text_completion", "created": g.created,
            "model": g.model, "choices": choices}
    if used is not None:
        body["usage"] = used
    return body


def sse(body: dict) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
