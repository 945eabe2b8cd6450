"""`lorakit serve` over HTTP (issue 14), on loopback, against the engine itself: what the server
answers for a greedy (or seeded) request must be what `Engine.generate` gives for the same prompt
and adapter; bad input gets OpenAI-shaped errors with the right status, never a 500.

Every server here is a tiny Llama behind uvicorn on 127.0.0.1, a free port, in a thread of this
process; each fixture stops its server in its teardown."""

from __future__ import annotations

import asyncio
import gc
import contextlib
import shutil
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.data import encode_prompt
from lorakit.serving import Engine
from lorakit.serving.server import ServerOptions, make_app

from conftest import tiny_llama
from test_generate import word_tokenizer
from test_serving import PEFT_ADAPTERS, save_peft

TEXTS = ["name : w3 | w4", "w7 w8 w9 w10 w11 w12", "name : w50"]
NEW = 8
ERROR_KEYS = {"message", "type", "param", "code"}


def new_engine(**kw) -> Engine:
    return Engine(tiny_llama(), word_tokenizer(), **{"max_batch": 4, "max_rank": 16, **kw})


class Running:
    """A server on 127.0.0.1 in a thread; `stop` ends it (uvicorn's graceful shutdown)."""

    def __init__(self, engine: Engine, options: ServerOptions) -> None:
        self.engine = engine
        self.app = make_app(engine, options)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=10)

    def metric(self, name: str, **labels) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels``."""
        return sum(sample.value for family in text_string_to_metric_families(self.http.get("/metrics").text)
                   for sample in family.samples
                   if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))

    def stop(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "the server did not stop"


@contextlib.contextmanager
def serving(engine: Engine, **options):
    running = Running(engine, ServerOptions(**options))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def adapter_paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("served")
    return {name: save_peft(root / name, seed, **PEFT_ADAPTERS[name]) for seed, name in ((1, "qv"), (2, "all"))}


@pytest.fixture(scope="module")
def reference(adapter_paths) -> Engine:
    """The engine the server's answers are compared with (same weights, same adapters)."""
    engine = new_engine()
    for name, path in adapter_paths.items():
        engine.add_adapter(name, path)
    return engine


@pytest.fixture(scope="module")
def server(adapter_paths):
    engine = new_engine()
    for name, path in adapter_paths.items():
        engine.add_adapter(name, path)
    with serving(engine, max_body_bytes=16384) as running:
        yield running


def expected(reference: Engine, ids: list[int], adapter: str | None, **kw) -> tuple[str, int]:
    """The engine's own text (as the server leaves it: unstripped) and token count for one prompt."""
    request = reference.submit(ids, adapter, **{"max_new_tokens": NEW, **kw})
    for _ in reference.stream(request):
        pass
    return request.text, len(request.tokens)


# --- answers equal the engine's ------------------------------------------------------------------

@pytest.mark.parametrize("adapter", [None, "qv"], ids=["base", "qv"])
def test_completion_logprobs_are_the_engines_streamed_or_not(server, reference, adapter) -> None:
    tok, client, model = reference.tokenizer, server.client(), adapter or "base"
    ids = encode_prompt(TEXTS[1], tok)
    request = reference.submit(ids, adapter, max_new_tokens=NEW, logprobs=2)
    for _ in reference.stream(request):
        pass
    got = client.completions.create(model=model, prompt=TEXTS[1], max_tokens=NEW, temperature=0, logprobs=2)
    lp = got.choices[0].logprobs
    assert lp.tokens == [tok.decode([t]) for t in request.tokens]
    assert lp.token_logprobs == pytest.approx([x.logprob for x in request.logprobs], abs=1e-5)
    assert [list(top) for top in lp.top_logprobs] == [[tok.decode([t]) for t, _ in x.top] for x in request.logprobs]
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    chunks = list(client.completions.create(model=model, prompt=TEXTS[1], max_tokens=NEW, temperature=0,
                                            logprobs=2, stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert sum((s.tokens for s in streamed), []) == lp.tokens
    assert sum((s.token_logprobs for s in streamed), []) == pytest.approx(lp.token_logprobs, abs=1e-6)
    assert sum((s.text_offset for s in streamed), []) == lp.text_offset
    plain = client.completions.create(model=model, prompt=TEXTS[1], max_tokens=NEW, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].text == got.choices[0].text


def test_models_lists_the_base_and_every_adapter(server) -> None:
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["base", "qv", "all"]
    assert server.http.get("/health").json() == {"status": "ok"}


@pytest.mark.parametrize("adapter", [None, "qv", "all"], ids=["base", "qv", "all"])
def test_completions_and_chat_equal_the_engine_greedy(server, reference, adapter) -> None:
    tok, client, model = reference.tokenizer, server.client(), adapter or "base"
    for text in TEXTS:
        ids = encode_prompt(text, tok)
        want, n = expected(reference, ids, adapter)
        got = client.completions.create(model=model, prompt=text, max_tokens=NEW, temperature=0)
        assert got.choices[0].text == want and got.model == model
        assert n == len(reference.generate([ids], [adapter], max_new_tokens=NEW)[0])
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(ids), n)
        assert got.choices[0].finish_reason == ("length" if n == NEW else "stop")

        chat_ids = encode_prompt(text, tok, chat_template=True)
        want, n = expected(reference, chat_ids, adapter)
        got = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                             max_tokens=NEW, temperature=0)
        assert got.choices[0].message.content == want and got.choices[0].message.role == "assistant"
        assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == \
            (len(chat_ids), n, len(chat_ids) + n)
    ids = encode_prompt(TEXTS[0], tok)  # token ids in: the prompt as given
    got = client.completions.create(model=model, prompt=ids, max_tokens=NEW, temperature=0)
    assert got.choices[0].text == expected(reference, ids, adapter)[0]


def test_sampling_seed_and_stop_strings_as_the_engine(server, reference) -> None:
    ids, client = encode_prompt(TEXTS[1], reference.tokenizer), server.client()
    want, _ = expected(reference, ids, "qv", temperature=0.9, top_p=0.8, seed=7)
    runs = [client.completions.create(model="qv", prompt=TEXTS[1], max_tokens=NEW, temperature=0.9, top_p=0.8,
                                      seed=7).choices[0].text for _ in range(2)]
    assert runs == [want, want]
    greedy, _ = expected(reference, ids, "qv")
    stop = greedy.split()[2]
    want, _ = expected(reference, ids, "qv", stop=[stop])
    got = client.completions.create(model="qv", prompt=TEXTS[1], max_tokens=NEW, temperature=0, stop=stop)
    assert got.choices[0].text == want and stop not in want and got.choices[0].finish_reason == "stop"


def test_streams_reassemble_to_the_same_text(server) -> None:
    client = server.client()
    for model in ("base", "all"):
        whole = client.completions.create(model=model, prompt=TEXTS[0], max_tokens=NEW, temperature=0)
        chunks = list(client.completions.create(model=model, prompt=TEXTS[0], max_tokens=NEW, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices

        messages = [{"role": "system", "content": "w1 w2"}, {"role": "user", "content": TEXTS[2]}]
        whole = client.chat.completions.create(model=model, messages=messages, max_tokens=NEW, temperature=0)
        chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=NEW, temperature=0,
                                                     stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
        assert chunks[-1].usage.total_tokens == whole.usage.total_tokens  # usage on the last chunk, always

    async def both() -> list[str]:  # the async client, two streams at once
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)

        async def one(model: str) -> str:
            stream = await aclient.completions.create(model=model, prompt=TEXTS[1], max_tokens=NEW, temperature=0,
                                                      stream=True)
            return "".join([c.choices[0].text async for c in stream])
        try:
            return await asyncio.gather(one("qv"), one("base"))
        finally:
            await aclient.close()

    texts = asyncio.run(both())
    assert texts == [client.completions.create(model=m, prompt=TEXTS[1], max_tokens=NEW, temperature=0)
                     .choices[0].text for m in ("qv", "base")]
    raw = server.http.post("/v1/completions", json={"model": "base", "prompt": TEXTS[0], "max_tokens": 3,
                                                    "temperature": 0, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.endswith("data: [DONE]\n\n") and raw.text.count("data: ") >= 2


# --- errors --------------------------------------------------------------------------------------

def _body(**fields) -> dict:
    return {"model": "base", "prompt": TEXTS[0], **fields}


ERRORS = [  # (path, body (bytes: sent as is), status, param)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", b"\xff\xfe", 400, None),
    ("/v1/completions", b"[" * 50000 + b"]" * 50000, 413, None),   # too deep for json, and over the limit anyway
    ("/v1/completions", b"[" * 5000 + b"]" * 5000, 400, None),     # within the limit, too deep for json
    ("/v1/completions", {"prompt": "w1"}, 400, "model"),
    ("/v1/completions", _body(model=3), 400, "model"),
    ("/v1/completions", _body(model="nope"), 404, "model"),
    ("/v1/completions", _body(max_tokens=-1), 400, "max_tokens"),
    ("/v1/completions", _body(max_tokens=0), 400, "max_tokens"),
    ("/v1/completions", _body(max_tokens="5"), 400, "max_tokens"),
    ("/v1/completions", _body(max_tokens=2.5), 400, "max_tokens"),
    ("/v1/completions", _body(max_tokens=61), 400, "max_tokens"),         # 5 + 61 - 1 > 64 positions
    ("/v1/completions", _body(prompt="w1 " * 80), 400, "prompt"),         # past the context
    ("/v1/completions", _body(prompt=["w1", "w2"]), 400, "prompt"),
    ("/v1/completions", _body(prompt=[5, 1000]), 400, "prompt"),          # outside the vocabulary
    ("/v1/completions", _body(prompt=[]), 400, "prompt"),
    ("/v1/completions", _body(prompt=None), 400, "prompt"),
    ("/v1/completions", _body(temperature="hot"), 400, "temperature"),
    ("/v1/completions", _body(temperature=-0.5), 400, "temperature"),
    ("/v1/completions", _body(top_p=0), 400, "top_p"),
    ("/v1/completions", _body(seed=1.5), 400, "seed"),
    ("/v1/completions", _body(seed=2**70), 400, "seed"),
    ("/v1/completions", _body(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("/v1/completions", _body(stop=[""]), 400, "stop"),
    ("/v1/completions", _body(stream="yes"), 400, "stream"),
    ("/v1/completions", _body(stream_options={"include_usage": True}), 400, "stream_options"),
    ("/v1/completions", _body(n=2), 400, "n"),
    ("/v1/completions", _body(logprobs=21), 400, "logprobs"),
    ("/v1/completions", _body(logprobs=-1), 400, "logprobs"),
    ("/v1/completions", _body(logprobs="2"), 400, "logprobs"),
    ("/v1/completions", _body(echo=True), 400, "echo"),
    ("/v1/completions", _body(presence_penalty=0.5), 400, "presence_penalty"),
    ("/v1/chat/completions", {"model": "base"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "base", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "base", "messages": ["hi"]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "tool", "content": "x"}]}, 400,
     "messages[0].role"),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content"),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "w1"}], "logprobs": True},
     400, "logprobs"),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "w1"}], "n": 3}, 400, "n"),
    ("/v1/chat/completions", {"model": "zzz", "messages": [{"role": "user", "content": "w1"}]}, 404, "model"),
    ("/v1/load_lora_adapter", {"lora_name": "x"}, 400, "lora_path"),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "x"}, 400, "lora_path"),  # no --adapter-dir
    ("/v1/unload_lora_adapter", {"lora_name": "never"}, 404, "lora_name"),
    ("/v1/nothing", {}, 404, None),
]


@pytest.mark.parametrize("path, body, status, param", ERRORS, ids=[f"{i}-{e[2]}" for i, e in enumerate(ERRORS)])
def test_bad_requests_get_openai_errors(server, path, body, status, param) -> None:
    sent = server.http.post(path, content=body) if isinstance(body, bytes) else server.http.post(path, json=body)
    assert sent.status_code == status, sent.text
    error = sent.json()["error"]
    assert set(error) == ERROR_KEYS and error["param"] == param and len(error["message"]) > 20


def test_body_limits_method_and_the_client_library_errors(server) -> None:
    big = {"model": "base", "prompt": "w1 " * 10000}
    assert server.http.post("/v1/completions", json=big).status_code == 413
    chunked = server.http.post("/v1/completions", content=iter([b'{"model": "base", "prompt": "', b"w1 " * 8000,
                                                                 b'"}']))  # no Content-Length: counted while read
    assert chunked.status_code == 413 and "--max-body-bytes" in chunked.json()["error"]["message"]
    wrong = server.http.get("/v1/completions")
    assert wrong.status_code == 405 and set(wrong.json()["error"]) == ERROR_KEYS
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.client().completions.create(model="nope", prompt="w1", max_tokens=2)


def test_api_key_guards_every_v1_route(adapter_paths) -> None:
    with serving(new_engine(), api_key="s3cret") as running:
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                             ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                            {"Authorization": "Basic s3cret"}):
                answer = running.http.request(method, path, json=_body(), headers=headers)
                assert answer.status_code == 401 and answer.json()["error"]["type"] == "authentication_error", path
        with pytest.raises(openai.AuthenticationError):
            running.client("wrong").models.list()
        got = running.client("s3cret").completions.create(model="base", prompt=TEXTS[0], max_tokens=3, temperature=0)
        assert got.usage.completion_tokens >= 1
        assert running.http.get("/health").status_code == 200 and running.http.get("/metrics").status_code == 200


# --- adapters at run time ---------------------------------------------------------------------

def test_load_and_unload_adapters_at_run_time(adapter_paths, reference, tmp_path) -> None:
    root = tmp_path / "adapters"
    root.mkdir()
    shutil.copytree(adapter_paths["qv"], root / "qv")
    shutil.copytree(adapter_paths["qv"], root / "corrupt")
    (root / "corrupt" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    other = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    save_peft(root / "mismatched", 5, base=other, **PEFT_ADAPTERS["qv"])  # another base: other shapes
    outside = tmp_path / "outside"
    shutil.copytree(adapter_paths["qv"], outside)
    (root / "link").symlink_to(outside)
    (root / "inner").symlink_to(root / "qv")  # a link that stays inside is fine

    engine = new_engine()
    with serving(engine, adapter_dir=root) as running:
        http, client = running.http, running.client()
        load = lambda name, path: http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        assert load("task", "qv").status_code == 200
        assert load("task2", str(root / "inner")).status_code == 200
        assert [m.id for m in client.models.list().data] == ["base", "task", "task2"]
        ids = encode_prompt(TEXTS[0], reference.tokenizer)
        want, _ = expected(reference, ids, "qv")
        for name in ("task", "task2"):
            assert client.completions.create(model=name, prompt=TEXTS[0], max_tokens=NEW,
                                             temperature=0).choices[0].text == want

        # a stream runs while bad adapters are refused: it ends as it would have, the adapters stay
        stream = client.completions.create(model="task", prompt=TEXTS[0], max_tokens=NEW, temperature=0, stream=True)
        first = next(iter(stream))
        refusals = {"corrupt": ("corrupt", 400), "mismatched": ("mismatched", 400), "escape": ("../outside", 400),
                    "linked": ("link", 400), "absolute": (str(outside), 400), "missing": ("nothing-here", 400),
                    "task": ("qv", 400), "base": ("qv", 400), "bad.name": ("qv", 400)}
        for name, (path, status) in refusals.items():
            answer = load(name, path)
            assert answer.status_code == status, (name, answer.text)
            assert set(answer.json()["error"]) == ERROR_KEYS
        assert "safetensors" in load("x", "corrupt").json()["error"]["message"].lower()
        assert first.choices[0].text + "".join(c.choices[0].text for c in stream) == want
        assert [m.id for m in client.models.list().data] == ["base", "task", "task2"]

        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "task2"}).status_code == 200
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="task2", prompt=TEXTS[0], max_tokens=2)
        assert running.metric("lorakit_adapter_loads_total") == 2
        assert running.metric("lorakit_adapter_unloads_total") == 1


def test_unloading_an_adapter_in_use_is_refused(adapter_paths) -> None:
    engine = new_engine()
    engine.add_adapter("qv", adapter_paths["qv"])
    _slow_steps(engine)
    with serving(engine) as running:
        with running.http.stream("POST", "/v1/completions", json=_body(model="qv", max_tokens=40, ignore_eos=True,
                                                                         stream=True)) as stream:
            lines = stream.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)
            answer = running.http.post("/v1/unload_lora_adapter", json={"lora_name": "qv"})
            assert answer.status_code == 409 and "in use" in answer.json()["error"]["message"]
        _wait(lambda: not engine.running)
        assert running.http.post("/v1/unload_lora_adapter", json={"lora_name": "qv"}).status_code == 200


# --- reliability -----------------------------------------------------------------------------------

def _slow_steps(engine: Engine, seconds: float = 0.02) -> None:
    """Each step takes a little longer, so that a client can leave in the middle of a request."""
    step = engine.step

    def slow():
        time.sleep(seconds)
        return step()
    engine.step = slow


def _wait(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_client_that_leaves_frees_its_slot_and_a_full_queue_answers_503() -> None:
    engine = new_engine(max_batch=1)
    _slow_steps(engine)
    with serving(engine, max_queue=0) as running:
        http, long = running.http, _body(max_tokens=50, ignore_eos=True)
        with http.stream("POST", "/v1/completions", json={**long, "stream": True}) as stream:
            lines = stream.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)
            assert engine.running
            busy = http.post("/v1/completions", json=_body(max_tokens=2))
            assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
            assert set(busy.json()["error"]) == ERROR_KEYS
        _wait(lambda: not engine.running and running.metric("lorakit_requests_total", finish_reason="cancelled") == 1)
        with pytest.raises(httpx.ReadTimeout):  # a client that gives up waiting for a whole answer
            http.post("/v1/completions", json=long, timeout=0.2)
        _wait(lambda: running.metric("lorakit_requests_total", finish_reason="cancelled") == 2 and not engine.running)
        got = running.client().completions.create(model="base", prompt=TEXTS[0], max_tokens=3, temperature=0)
        assert got.usage.completion_tokens >= 1  # the slot is free again
        assert running.metric("lorakit_generation_tokens_total", model="base") < 2 * 50


def test_metrics_move_with_requests(server) -> None:
    before = {key: server.metric(*key[:1], **dict(key[1:])) for key in (
        ("lorakit_requests_total", ("model", "qv"), ("finish_reason", "length")),
        ("lorakit_generation_tokens_total", ("model", "qv")),
        ("lorakit_prompt_tokens_total", ("model", "qv")),
        ("lorakit_time_to_first_token_seconds_count", ("model", "qv")),
        ("lorakit_inter_token_latency_seconds_count", ("model", "qv")))}
    got = server.client().completions.create(model="qv", prompt=TEXTS[0], max_tokens=4, temperature=0,
                                             extra_body={"ignore_eos": True})
    after = {key: server.metric(*key[:1], **dict(key[1:])) for key in before}
    deltas = [after[k] - before[k] for k in before]
    assert deltas == [1, 4, got.usage.prompt_tokens, 1, 3]
    text = server.http.get("/metrics").text
    for name in ("lorakit_queue_depth", "lorakit_running_requests", "lorakit_adapter_evictions_total",
                 "lorakit_adapters_loaded", 'lorakit_http_responses_total{route="/v1/completions",status="200"}'):
        assert name in text


def test_adapter_evictions_are_counted(adapter_paths) -> None:
    engine = new_engine(max_adapters=1)
    for name, path in adapter_paths.items():
        engine.add_adapter(name, path)
    with serving(engine) as running:
        client = running.client()
        for model in ("qv", "all", "qv"):
            client.completions.create(model=model, prompt=TEXTS[0], max_tokens=2, temperature=0)
        assert running.metric("lorakit_adapter_evictions_total") == 2


def test_an_engine_failure_is_a_500_and_the_server_goes_on() -> None:
    engine = new_engine()
    step, calls = engine.step, []

    def failing_once():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return step()
    engine.step = failing_once
    with serving(engine) as running:
        answer = running.http.post("/v1/completions", json=_body(max_tokens=3))
        assert answer.status_code == 500 and set(answer.json()["error"]) == ERROR_KEYS
        assert running.http.post("/v1/completions", json=_body(max_tokens=3)).status_code == 200
        assert running.http.get("/health").status_code == 200


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.parametrize("requests, clients", [(48, 12), (200, 32)],
                         ids=["48x12", "200x32"])
def test_concurrent_clients_over_mixed_adapters_while_adapters_change(adapter_paths, reference, tmp_path,
                                                                     requests, clients) -> None:
    """``requests`` requests from ``clients`` concurrent clients (base, qv, all; every fifth stream
    dropped after its first chunk) while an adapter is loaded and unloaded: every finished answer is
    its answer alone, none is lost or duplicated, the server stays healthy, and afterwards nothing
    is left behind (no request in the engine, every request counted ended, as many live tensors
    as before)."""
    root = tmp_path / "adapters"
    shutil.copytree(adapter_paths["all"], root / "extra")
    engine = new_engine(max_batch=6, max_adapters=2)
    for name, path in adapter_paths.items():
        engine.add_adapter(name, path)
    tok = reference.tokenizer
    alone = {(m, t): expected(reference, encode_prompt(t, tok), None if m == "base" else m)[0]
             for m in ("base", "qv", "all") for t in TEXTS}

    async def main(running: Running) -> tuple[list, list]:
        aclient = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="none", max_retries=0, timeout=60)
        async with httpx.AsyncClient(base_url=running.url, timeout=60) as http:
            results, dropped = [], []

            async def worker(w: int) -> None:
                for i in range(w, requests, clients):
                    model, text = ("base", "qv", "all")[i % 3], TEXTS[(i // 3) % len(TEXTS)]
                    if i % 5 == 0:  # open a stream and leave after its first chunk
                        stream = await aclient.completions.create(model=model, prompt=text, max_tokens=NEW,
                                                                  temperature=0, stream=True)
                        async for _ in stream:
                            break
                        await stream.close()
                        dropped.append(i)
                    else:
                        got = await aclient.completions.create(model=model, prompt=text, max_tokens=NEW,
                                                               temperature=0, user=str(i))
                        results.append((i, (model, text), got.choices[0].text))

            async def churn() -> None:
                for _ in range(3):
                    assert (await http.post("/v1/load_lora_adapter", json={"lora_name": "extra",
                                                                          "lora_path": "extra"})).status_code == 200
                    assert (await http.get("/health")).status_code == 200
                    assert (await http.post("/v1/unload_lora_adapter", json={"lora_name": "extra"})).status_code == 200
            await asyncio.gather(churn(), *(worker(w) for w in range(clients)))
        await aclient.close()
        return results, dropped

    with serving(engine, adapter_dir=root) as running:
        warm = running.client().completions.create(model="qv", prompt=TEXTS[0], max_tokens=NEW, temperature=0)
        assert warm.choices[0].text == alone[("qv", TEXTS[0])]
        _wait(lambda: not engine.running and not engine.waiting)
        before = _live_tensors()
        results, dropped = asyncio.run(main(running))
        done = sorted([i for i, _, _ in results] + dropped)
        assert done == list(range(requests))  # none lost, none twice
        assert all(text == alone[key] for _, key, text in results)
        _wait(lambda: not engine.running and not engine.waiting)
        ended = sum(running.metric("lorakit_requests_total", finish_reason=r) for r in ("stop", "length", "cancelled"))
        assert ended == requests + 1 and running.http.get("/health").status_code == 200
        assert engine.adapters == ["qv", "all"]
        assert _live_tensors() <= before  # nothing kept per request


def test_the_page_is_served() -> None:
    with serving(new_engine(), api_key="k") as running:
        page = running.http.get("/")  # the page needs no key; its requests send the one typed in
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "/v1/models" in page.text and "/v1/chat/completions" in page.text and "getReader" in page.text


def test_a_served_name_that_is_an_adapter_is_refused(adapter_paths, tmp_path) -> None:
    engine = new_engine()
    engine.add_adapter("qv", adapter_paths["qv"])
    with pytest.raises(ValueError, match="served name 'qv'"):
        make_app(engine, ServerOptions(served_model_name="qv"))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        make_app(engine, ServerOptions(adapter_dir=tmp_path / "missing"))
    with serving(engine, served_model_name="tiny") as running:
        assert [m.id for m in running.client().models.list().data] == ["tiny", "qv"]
        assert running.http.post("/v1/completions", json=_body(model="tiny", max_tokens=2)).status_code == 200
        assert running.http.post("/v1/completions", json=_body(max_tokens=2)).status_code == 404


def test_adapter_files_are_read_while_generation_goes_on(adapter_paths, tmp_path) -> None:
    """/v1/load_lora_adapter reads and checks the files off the engine's thread: a request sent
    while a (slowed) read is under way finishes before the read does."""
    root = tmp_path / "adapters"
    shutil.copytree(adapter_paths["qv"], root / "extra")
    engine, statuses = new_engine(), []
    read = engine.read_adapter

    def slow_read(path):
        time.sleep(1.5)
        return read(path)

    engine.read_adapter = slow_read
    with serving(engine, adapter_dir=root) as running:
        loader = threading.Thread(target=lambda: statuses.append(running.http.post(
            "/v1/load_lora_adapter", json={"lora_name": "extra", "lora_path": "extra"}).status_code))
        loader.start()
        time.sleep(0.3)  # the read is under way
        start = time.monotonic()
        got = running.client().completions.create(model="base", prompt=TEXTS[0], max_tokens=NEW, temperature=0)
        took = time.monotonic() - start
        loader.join(timeout=10)
        assert statuses == [200] and got.usage.completion_tokens > 0
        assert took < 1.0, f"the request waited {took:.2f} s for the adapter's files"
        assert [m.id for m in running.client().models.list().data] == ["base", "extra"]
