"""`lorakit serve` at the edges of its inputs: a prefix-tuned adapter's context, empty and overlong
prompts, stop strings with logprobs, odd adapter names and paths, bad options, and a shutdown that
runs past its timeout. Every error is OpenAI's shape with a 4xx (or the 503 of a server that stops).

Servers bind 127.0.0.1 only, on a free port, and each test stops its own (as in test_server.py)."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time

import httpx
import pytest

from lorakit.data import encode_prompt
from lorakit.prefix import PrefixEmbedding, save_prefix
from lorakit.serving.server import ServerOptions, make_app, make_server

from conftest import tiny_llama
from test_server import ERROR_KEYS, TEXTS, _body, _slow_steps, _wait, new_engine, serving
from test_serving import PEFT_ADAPTERS, save_peft

N_PREFIX = 8


@pytest.fixture(scope="module")
def prefixed(tmp_path_factory) -> str:
    """A LoRA adapter saved with N_PREFIX prefix embeddings (train --n-prefix)."""
    path = save_peft(tmp_path_factory.mktemp("prefixed") / "pre", 3, **PEFT_ADAPTERS["qv"])
    save_prefix(PrefixEmbedding.from_vocabulary(tiny_llama(), N_PREFIX, seed=0), path)
    return path


def _error(answer: httpx.Response, status: int, param: str | None, code: str | None = None) -> dict:
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == ERROR_KEYS and error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


# --- the context -------------------------------------------------------------------------------

def test_a_prefix_adapters_virtual_tokens_count_against_the_context(prefixed) -> None:
    """Without max_tokens a request gets what the context leaves after its prompt and its adapter's
    n_prefix; an explicit max_tokens one past that, or a prompt that only fits without the prefix,
    is a 400 naming the field (code context_length_exceeded), as OpenAI answers an overlong request."""
    engine = new_engine()
    engine.add_adapter("pre", prefixed)
    tok, limit = engine.tokenizer, engine.max_seq_len
    n = len(encode_prompt(TEXTS[0], tok))
    most = limit - n - N_PREFIX + 1            # the last new token needs no position
    long_text = "w1 " * (limit - N_PREFIX + 1)  # fits the context alone, not behind the prefix
    assert limit - N_PREFIX < len(encode_prompt(long_text, tok)) <= limit
    long_chat = "w1 " * (limit - N_PREFIX - 4)
    assert limit - N_PREFIX < len(encode_prompt(long_chat, tok, chat_template=True)) <= limit
    with serving(engine) as running:
        http, client = running.http, running.client()
        chat = client.chat.completions.create(model="pre", messages=[{"role": "user", "content": TEXTS[0]}],
                                              temperature=0, extra_body={"ignore_eos": True})
        assert chat.choices[0].finish_reason == "length"
        assert chat.usage.completion_tokens == limit - chat.usage.prompt_tokens - N_PREFIX + 1
        plain = http.post("/v1/chat/completions", json={"model": "base", "temperature": 0, "ignore_eos": True,
                                                         "messages": [{"role": "user", "content": TEXTS[0]}]})
        assert plain.json()["usage"]["completion_tokens"] == limit - chat.usage.prompt_tokens + 1  # no prefix

        fits = http.post("/v1/completions", json=_body(model="pre", max_tokens=most, ignore_eos=True))
        assert fits.status_code == 200 and fits.json()["usage"]["completion_tokens"] == most
        over = _error(http.post("/v1/completions", json=_body(model="pre", max_tokens=most + 1)), 400, "max_tokens",
                      "context_length_exceeded")
        assert f"{N_PREFIX} prefix tokens" in over["message"] and f"max_tokens to {most} " in over["message"]

        assert http.post("/v1/completions", json=_body(prompt=long_text, max_tokens=1)).status_code == 200
        _error(http.post("/v1/completions", json=_body(model="pre", prompt=long_text, max_tokens=1)), 400, "prompt",
               "context_length_exceeded")
        _error(http.post("/v1/chat/completions", json={"model": "pre", "max_tokens": 1,
                                                        "messages": [{"role": "user", "content": long_chat}]}),
               400, "messages", "context_length_exceeded")
        _error(http.post("/v1/chat/completions", json={"model": "base", "messages": [
            {"role": "user", "content": "w1 " * limit}]}), 400, "messages", "context_length_exceeded")


@pytest.mark.parametrize("prompt", ["", "   ", "\n"], ids=["empty", "spaces", "newline"])
def test_an_empty_prompt_is_named(prompt: str) -> None:
    with serving(new_engine()) as running:
        error = _error(running.http.post("/v1/completions", json=_body(prompt=prompt)), 400, "prompt")
        assert "empty" in error["message"]


def test_logprobs_end_with_the_text_a_stop_string_cut() -> None:
    """The stop string's tokens are cut with its text: logprobs cover the tokens of the returned
    text only, streamed or not (the usage still counts every token generated)."""
    engine, reference = new_engine(), new_engine()
    tok = reference.tokenizer
    request = reference.submit(encode_prompt(TEXTS[0], tok), None, max_new_tokens=8, ignore_eos=True)
    for _ in reference.stream(request):
        pass
    words = [tok.decode([t]) for t in request.tokens]
    # the first word that no earlier word starts with: " " + it first shows up in the text there
    j = next(i for i in range(1, len(words)) if words[i].startswith("w") and all(w.startswith("w") for w in words[:i])
             and not any(w.startswith(words[i]) for w in words[:i]))
    body = _body(max_tokens=8, temperature=0, ignore_eos=True, logprobs=1, stop=" " + words[j])
    with serving(engine) as running:
        whole = running.http.post("/v1/completions", json=body).json()
        choice = whole["choices"][0]
        assert choice["text"] == " ".join(words[:j]) and choice["finish_reason"] == "stop"
        assert choice["logprobs"]["tokens"] == words[:j] and len(choice["logprobs"]["token_logprobs"]) == j
        assert whole["usage"]["completion_tokens"] == j + 1
        with running.http.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
            chunks = [json.loads(line[6:]) for line in stream.iter_lines() if line and line != "data: [DONE]"]
        streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
        assert sum((s["tokens"] for s in streamed), []) == words[:j]
        assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]


# --- adapters ----------------------------------------------------------------------------------

def test_adapter_names_are_checked_where_they_are_given(prefixed, tmp_path) -> None:
    engine = new_engine()
    wrong = tmp_path / "wrong"  # a folder whose prefix file is for another model
    save_prefix(PrefixEmbedding(2, 48), wrong)
    with pytest.raises(ValueError, match="adapter name 'a.b' is not usable"):
        engine.add_adapter("a.b", wrong)  # the name first, before any file is read
    root = tmp_path / "adapters"
    shutil.copytree(prefixed, root / "pre")
    with serving(engine, adapter_dir=root) as running:
        for name in ("a.b", "."):
            answer = running.http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "pre"})
            assert "not usable" in _error(answer, 400, "lora_name")["message"]
        assert running.http.post("/v1/load_lora_adapter", json={"lora_name": "pre", "lora_path": "pre"}).status_code \
            == 200


@pytest.mark.parametrize("any_path", [False, True], ids=["adapter-dir", "any-path"])
def test_a_nul_byte_in_lora_path_is_a_400(tmp_path, any_path: bool) -> None:
    with serving(new_engine(), adapter_dir=tmp_path, allow_any_adapter_path=any_path) as running:
        for path in ("a\0b", "\0", str(tmp_path) + "/\0"):
            answer = running.http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
            assert "NUL" in _error(answer, 400, "lora_path")["message"]
        assert running.http.get("/health").status_code == 200


# --- options -----------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["", "   ", " k"], ids=["empty", "blank", "padded"])
def test_an_empty_api_key_is_refused_not_taken_as_none(key: str) -> None:
    with pytest.raises(ValueError, match="--api-key"):
        make_app(new_engine(), ServerOptions(api_key=key))


@pytest.mark.parametrize("port", [65536, 83641, -1])
def test_a_port_outside_0_to_65535_is_refused(port: int) -> None:
    with pytest.raises(ValueError, match=f"--port {port}: a TCP port is a number from 0 to 65535"):
        make_server(new_engine(), port=port)


# --- the running batch ---------------------------------------------------------------------------

def test_the_batch_gauges_follow_cancelled_requests() -> None:
    """running_requests and queue_depth move when a request is cancelled, not only after a step
    (after the last request leaves, no step comes)."""
    engine = new_engine(max_batch=1)
    _slow_steps(engine)
    long = {**_body(max_tokens=50, ignore_eos=True), "stream": True}
    with serving(engine) as running:
        gauges = lambda: (running.metric("lorakit_running_requests"), running.metric("lorakit_queue_depth"))
        with running.http.stream("POST", "/v1/completions", json=long) as first:
            lines = first.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)
            with running.http.stream("POST", "/v1/completions", json=long):
                _wait(lambda: gauges() == (1, 1))
            _wait(lambda: gauges() == (1, 0))
        _wait(lambda: not engine.running)
        _wait(lambda: gauges() == (0, 0), timeout=2)  # no step comes after the last request's cancel


def test_requests_past_the_shutdown_timeout_get_a_503_and_streams_an_error_then_done() -> None:
    """A shutdown (what SIGTERM does) whose timeout runs out cancels the running requests itself:
    a whole answer is an OpenAI-shaped 503, a stream ends with an error event and data: [DONE]."""
    engine = new_engine()
    _slow_steps(engine, 0.05)  # 50 tokens take 2.5 s, past the 0.5 s timeout
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = make_server(engine, ServerOptions(), host="127.0.0.1", port=port, shutdown_timeout=0.5,
                         log_level="critical")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url, got = f"http://127.0.0.1:{port}", {}
    long = _body(max_tokens=50, ignore_eos=True)

    def whole() -> None:
        got["whole"] = httpx.post(url + "/v1/completions", json=long, timeout=20)

    def streamed() -> None:
        with httpx.stream("POST", url + "/v1/completions", json={**long, "stream": True}, timeout=20) as stream:
            got["stream"] = [line for line in stream.iter_lines() if line]

    clients = [threading.Thread(target=whole), threading.Thread(target=streamed)]
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        for client in clients:
            client.start()
        _wait(lambda: len(engine.running) == 2)
        server.should_exit = True
        for client in clients:
            client.join(timeout=20)
    finally:
        server.should_exit = True
        thread.join(timeout=20)
    assert not thread.is_alive(), "the server did not stop"
    error = _error(got["whole"], 503, None)
    assert "shut down" in error["message"] and "--shutdown-timeout" in error["message"]
    events = got["stream"]
    assert events[-1] == "data: [DONE]", events[-3:]
    last = json.loads(events[-2][len("data: "):])
    assert set(last["error"]) == ERROR_KEYS and "shut down" in last["error"]["message"]
