"""`lorakit serve`: the OpenAI API (completions, chat, models) over the mixed-adapter engine, with
vLLM's routes to load and unload adapters at run time, /health, /metrics and a page at /.

    app = make_app(engine, ServerOptions(api_key="..."))     # an ASGI app; or, blocking:
    run(engine, ServerOptions(), host="127.0.0.1", port=8000)

A request's ``model`` is an adapter's name or the base model's served name (``base`` unless
``served_model_name`` says otherwise). The engine runs on a thread of its own (`server_loop.py`);
handlers hand it jobs and await their futures, so the event loop never waits on a forward.

Why this stack: Starlette and uvicorn (with prometheus-client for /metrics). Starlette is the small,
well-kept ASGI toolkit that FastAPI itself is built on: routing, streaming responses that notice a
client's disconnect (which cancels its request here), lifespan hooks. FastAPI would add pydantic
validation and generated docs, but its validation errors are 422s in its own shape, not OpenAI's
400s, so we would override them anyway; the bodies are checked by hand in `server_api.py` to say
which field is wrong. uvicorn is the reference ASGI server, with a graceful shutdown that stops
accepting and lets running responses finish; past a timeout, `make_server` cancels them itself, so
that each gets an OpenAI-shaped answer (uvicorn's own cancel cuts them). prometheus-client is the
Prometheus project's own client.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..data import encode_prompt
from ..io import check_adapter_name
from .engine import Engine
from .server_api import (DONE, ApiError, Generation, chunk_body, completion_logprobs, parse_chat, parse_completion,
                         read_json,
                         response_body, sse, string, usage)
from .server_loop import EngineLoop, Job
from .server_metrics import ServerMetrics

logger = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SHUTDOWN_GRACE = 2.0  # seconds, after the shutdown timeout, for cancelled requests to write their 503s


@dataclass(frozen=True)
class ServerOptions:
    """How the server treats requests (the engine's own limits are the Engine's).

    ``api_key``: every /v1 route needs ``Authorization: Bearer KEY`` (None: no key). ``adapter_dir``:
    /v1/load_lora_adapter loads only from under it (None: run-time loading is off), unless
    ``allow_any_adapter_path``. ``max_queue``: requests that may wait for the running batch before
    more are refused (503, Retry-After). ``max_body_bytes``: larger bodies get a 413.
    ``gil_switch_interval``: while the server runs, the process's ``sys.setswitchinterval`` (restored
    after): the engine's thread and the event loop share the GIL, and Python's default 5 ms lets the
    thread that streams tokens hold it for a whole decode step while the engine waits to launch the
    next one (None: leave it as it is)."""

    served_model_name: str = "base"
    api_key: str | None = None
    adapter_dir: str | Path | None = None
    allow_any_adapter_path: bool = False
    max_queue: int = 64
    max_body_bytes: int = 1 << 20
    gil_switch_interval: float | None = 0.0005


class Server:
    """The routes of one served engine (`make_app` builds its ASGI app)."""

    def __init__(self, engine: Engine, options: ServerOptions) -> None:
        if options.served_model_name in engine.adapters:
            raise ValueError(f"the base model's served name {options.served_model_name!r} is also an adapter's name; "
                             f"give the base another served_model_name or rename the adapter")
        if options.adapter_dir is not None and not Path(options.adapter_dir).is_dir():
            raise FileNotFoundError(f"adapter_dir {options.adapter_dir}: no such folder; create it or give another")
        key = options.api_key
        check_api_key(key)
        interval = options.gil_switch_interval
        if interval is not None and not (isinstance(interval, (int, float)) and 0 < interval <= 1):
            raise ValueError(f"gil_switch_interval must be a number of seconds in (0, 1] or None, got {interval!r}")
        self.engine, self.options = engine, options
        self.metrics = ServerMetrics()
        self.metrics.adapter_loads.inc(len(engine.adapters))
        self.loop = EngineLoop(engine, self.metrics, max_pending=engine.max_batch + options.max_queue)
        self.started = int(time.time())
        self._key = key.encode() if key is not None else None
        self._root = Path(options.adapter_dir).resolve() if options.adapter_dir is not None else None

    def app(self) -> Starlette:
        v1 = [("/v1/models", self.models, ["GET"]), ("/v1/completions", self.completions, ["POST"]),
              ("/v1/chat/completions", self.chat_completions, ["POST"]),
              ("/v1/load_lora_adapter", self.load_adapter, ["POST"]),
              ("/v1/unload_lora_adapter", self.unload_adapter, ["POST"])]
        open_routes = [("/health", self.health, ["GET"]), ("/metrics", self.prometheus, ["GET"]),
                       ("/", self.page, ["GET"])]
        routes = [Route(path, self._endpoint(path, handler, auth=True), methods=methods) for path, handler, methods in v1]
        routes += [Route(path, self._endpoint(path, handler, auth=False), methods=methods)
                   for path, handler, methods in open_routes]
        return Starlette(routes=routes, lifespan=self._lifespan,
                         exception_handlers={HTTPException: self._http_error, Exception: self._unexpected})

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette):
        interval = sys.getswitchinterval()
        if self.options.gil_switch_interval is not None:
            sys.setswitchinterval(self.options.gil_switch_interval)
        self.loop.start()
        try:
            yield
        finally:
            await asyncio.to_thread(self.loop.stop)
            sys.setswitchinterval(interval)

    # --- plumbing ------------------------------------------------------------------------------

    def _endpoint(self, route: str, handler: Callable[[HttpRequest], Awaitable[Response]], *, auth: bool):
        async def endpoint(request: HttpRequest) -> Response:
            try:
                if auth:
                    self._authorize(request)
                response = await handler(request)
            except ApiError as e:
                response = e.response()
            self.metrics.responses.labels(route, str(response.status_code)).inc()
            return response
        return endpoint

    def _authorize(self, request: HttpRequest) -> None:
        if self._key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken says nothing about how much of the key was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._key):
            raise ApiError(401, "missing or wrong API key: send the header Authorization: Bearer KEY, KEY being the "
                                "server's --api-key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _http_error(self, request: HttpRequest, exc: HTTPException) -> Response:
        message = {404: f"no route {request.url.path}; the API is under /v1 (GET /v1/models lists the models)",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        self.metrics.responses.labels("unknown", str(exc.status_code)).inc()
        return ApiError(exc.status_code, message).response()

    async def _unexpected(self, request: HttpRequest, exc: Exception) -> Response:
        logger.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return ApiError(500, f"internal server error ({type(exc).__name__}); this is a bug in lorakit serve, see "
                             f"the server's log").response()

    def _adapter_for(self, model: str) -> str | None:
        if model == self.options.served_model_name:
            return None
        if model in self.loop.adapters:
            return model
        raise ApiError(404, f"the model {model!r} does not exist; this server has "
                            f"{[self.options.served_model_name, *self.loop.adapters]} (GET /v1/models)",
                       param="model", code="model_not_found")

    # --- /v1 -------------------------------------------------------------------------------------

    async def models(self, request: HttpRequest) -> Response:
        base = self.options.served_model_name
        entry = {"object": "model", "created": self.started, "owned_by": "lorakit"}
        data = [{"id": base, **entry, "root": base, "parent": None}]
        data += [{"id": name, **entry, "root": base, "parent": base} for name in self.loop.adapters]
        return JSONResponse({"object": "list", "data": data})

    async def completions(self, request: HttpRequest) -> Response:
        g = parse_completion(await read_json(request, self.options.max_body_bytes))
        prompt, separator = g.prompt, self.engine.separator
        if isinstance(prompt, str):  # encoded as `lorakit train` and `generate` encode prompts: text + "\n"
            return await self._generate(request, g, lambda tok: encode_prompt(prompt, tok, separator=separator))
        vocab = getattr(self.engine.model.config, "vocab_size", None)
        if vocab is not None and not all(0 <= t < vocab for t in prompt):
            raise ApiError(400, f"prompt has token ids outside the model's vocabulary [0, {vocab})", param="prompt")
        return await self._generate(request, g, lambda tok: list(prompt))

    async def chat_completions(self, request: HttpRequest) -> Response:
        g = parse_chat(await read_json(request, self.options.max_body_bytes))
        return await self._generate(request, g, lambda tok: _chat_ids(tok, g.prompt))

    async def _generate(self, request: HttpRequest, g: Generation, encode: Callable) -> Response:
        adapter = self._adapter_for(g.model)
        job = Job(encode, adapter, g.model, g.max_tokens, g.engine_options(), g.stream, asyncio.get_running_loop(),
                  prompt_field="messages" if g.chat else "prompt")
        self.loop.submit(job)
        try:
            prompt_tokens = await job.accepted
        except asyncio.CancelledError:
            self.loop.cancel(job)
            raise
        if g.stream:
            return _EventStream(self._stream(g, job, prompt_tokens), lambda: self.loop.cancel(job))
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({job.done, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the server stops waiting (shutdown timeout)
            self.loop.cancel(job)
            raise
        finally:
            watcher.cancel()
        if not job.done.done():  # the client left: nobody reads an answer
            self.loop.cancel(job)
            return Response(status_code=499)
        result = job.done.result()  # raises the ApiError of a server that stopped
        if result.finish_reason == "cancelled":
            raise ApiError(503, "the request was cancelled before it finished", headers={"Retry-After": "1"})
        return JSONResponse(response_body(g, result.text, result.finish_reason,
                                          usage(prompt_tokens, result.completion_tokens), result.logprobs))

    async def _stream(self, g: Generation, job: Job, prompt_tokens: int) -> AsyncIterator[bytes]:
        ended, tokens, offset = False, 0, 0
        try:
            if g.chat:
                yield sse(chunk_body(g, "", role=True))
            while not ended:
                items = [await job.events.get()]
                while not job.events.empty() and not isinstance(items[-1], ApiError):
                    items.append(job.events.get_nowait())  # a client behind by several steps gets one chunk
                text, pieces, reason = "", [], None
                for item in items:
                    if isinstance(item, ApiError):  # the server stopped or failed: OpenAI's clients raise on this
                        ended = True
                        break
                    event, scored = item
                    tokens += len(event.tokens)
                    text, pieces, reason = text + event.text, pieces + scored, event.finish_reason
                    ended = event.finished
                if text or ended or pieces:
                    if reason != "cancelled" and not isinstance(item, ApiError):
                        scores = completion_logprobs(pieces, offset) if g.logprobs is not None else None
                        offset += sum(len(p["token"]) for p in pieces)
                        yield sse(chunk_body(g, text, reason, usage(prompt_tokens, tokens) if ended else None,
                                             logprobs=scores))
                    elif text or pieces:  # what came before the cancel or the error still reaches the client
                        yield sse(chunk_body(g, text, None,
                                             logprobs=completion_logprobs(pieces, offset) if g.logprobs is not None
                                             else None))
                if isinstance(item, ApiError):
                    yield sse(item.body())
                    break
                if reason == "cancelled":
                    yield sse(ApiError(503, "the request was cancelled before it finished").body())
                    break
            if g.include_usage:
                yield sse(chunk_body(g, None, used=usage(prompt_tokens, tokens)))
            yield DONE
        finally:  # the client left mid-stream (Starlette cancels this generator): free its slot
            if not ended:
                self.loop.cancel(job)

    async def load_adapter(self, request: HttpRequest) -> Response:
        body = await read_json(request, self.options.max_body_bytes)
        name, given = string(body, "lora_name"), string(body, "lora_path")
        if name == self.options.served_model_name:
            raise ApiError(400, f"lora_name {name!r} is the base model's served name; pick another name",
                           param="lora_name")
        try:
            check_adapter_name(name)
        except ValueError as e:
            raise ApiError(400, f"lora_name: {e}", param="lora_name") from None
        path = self._adapter_path(given)
        try:
            # read and checked off the engine's thread (generation goes on); only the install waits for a step
            factors = await asyncio.to_thread(self.engine.read_adapter, path)
            await self.loop.call(lambda engine: engine.add_adapter(name, factors))
        except (ValueError, OSError, KeyError) as e:  # the library's message: what is wrong with the adapter
            raise ApiError(400, f"adapter {name!r} was not loaded: {e}", param="lora_path",
                           code="invalid_adapter") from None
        self.metrics.adapter_loads.inc()
        logger.info("loaded adapter %r from %s", name, path)
        return JSONResponse({"object": "lora_adapter", "lora_name": name, "status": "loaded"})

    async def unload_adapter(self, request: HttpRequest) -> Response:
        name = string(await read_json(request, self.options.max_body_bytes), "lora_name")
        if name not in self.loop.adapters:
            raise ApiError(404, f"no adapter {name!r} is loaded; the adapters are {list(self.loop.adapters)}",
                           param="lora_name", code="model_not_found")
        try:
            await self.loop.call(lambda engine: engine.remove_adapter(name))
        except KeyError:
            raise ApiError(404, f"no adapter {name!r} is loaded", param="lora_name", code="model_not_found") from None
        except ValueError as e:  # requests still use it
            raise ApiError(409, f"{e}", param="lora_name", code="adapter_in_use") from None
        self.metrics.adapter_unloads.inc()
        logger.info("unloaded adapter %r", name)
        return JSONResponse({"object": "lora_adapter", "lora_name": name, "status": "unloaded"})

    def _adapter_path(self, given: str) -> Path:
        """The adapter folder ``given`` names: under --adapter-dir (no ``..``, no link out of it)."""
        if "\0" in given:  # no path has one (the OS refuses it: Path.resolve raises ValueError)
            raise ApiError(400, f"lora_path {given!r} has a NUL character; give an adapter folder's path",
                           param="lora_path")
        if self.options.allow_any_adapter_path:
            return Path(given).expanduser()
        if self._root is None:
            raise ApiError(400, "loading adapters at run time is off; start the server with --adapter-dir DIR "
                                "to load adapters from under DIR", param="lora_path")
        if ".." in Path(given).parts:
            raise ApiError(400, f"lora_path {given!r} has '..'; give a path inside --adapter-dir", param="lora_path")
        try:
            real = (self._root / given).resolve(strict=True)  # absolute paths are allowed when they lie inside
        except (OSError, RuntimeError):  # missing, or a loop of links
            raise ApiError(400, f"lora_path {given!r}: no such adapter folder under --adapter-dir",
                           param="lora_path") from None
        if not real.is_relative_to(self._root):
            raise ApiError(400, f"lora_path {given!r} leads outside --adapter-dir (by a link or an absolute path); "
                                f"put the adapter inside it", param="lora_path")
        return real

    # --- outside /v1 ----------------------------------------------------------------------------

    async def health(self, request: HttpRequest) -> Response:
        if not self.loop.alive:
            return JSONResponse({"status": "stopping"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def prometheus(self, request: HttpRequest) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    async def page(self, request: HttpRequest) -> Response:
        return HTMLResponse(resources.files(__package__).joinpath("server_page.html").read_text(encoding="utf-8"))


class _EventStream(StreamingResponse):
    """Server-sent events that call ``on_close`` however the response ends: a client that leaves
    before the first chunk, or whose socket fails on a write, never closes the generator itself.
    (Cancelling a job that has ended is a no-op.)"""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The messages through the tokenizer's chat template, with the assistant's turn opened (as
    `encode_prompt(..., chat_template=True)` renders a single user message)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template, so messages cannot be formatted; use "
                            "/v1/completions with a prompt instead", param="messages")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # noqa: BLE001 - a template may refuse roles or orders (a jinja exception)
        raise ApiError(400, f"the model's chat template refused these messages: {e}", param="messages") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template writes its special tokens


async def _disconnected(request: HttpRequest) -> None:
    """Returns when the client closes the connection (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def make_app(engine: Engine, options: ServerOptions | None = None) -> Starlette:
    """The ASGI app serving ``engine``; its lifespan starts and stops the engine's thread."""
    return Server(engine, options or ServerOptions()).app()


def check_api_key(key: str | None) -> None:
    """Refuse an API key that would not do what the operator meant (never shown: it is a secret)."""
    if key is not None and not isinstance(key, str):
        raise ValueError(f"api_key must be a string or None, got a {type(key).__name__}")
    if key is not None and not key.strip():
        raise ValueError("--api-key is empty, which would switch authentication off without a word: give a key, "
                         "or leave --api-key out to serve without one")
    if key is not None and key != key.strip():
        raise ValueError("--api-key starts or ends with spaces, which no client's Authorization header can "
                         "match: remove them")


def check_port(port: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: a TCP port is a number from 0 to 65535")


def make_server(engine: Engine, options: ServerOptions | None = None, *, host: str = "127.0.0.1", port: int = 8000,
                shutdown_timeout: float = 10.0, log_level: str = "info"):
    """The uvicorn server that `run` runs (``.run()`` blocks; ``.should_exit = True`` is what SIGTERM
    does). Its shutdown stops accepting connections and lets running requests finish for up to
    ``shutdown_timeout`` seconds; then it cancels the rest itself, so each still gets an answer: a
    503 in OpenAI's shape, or a stream's error event and ``data: [DONE]``. (uvicorn's own cancel,
    `SHUTDOWN_GRACE` seconds later, is a backstop for a handler that does not end: it would answer a
    plain-text 500 and cut a stream mid-way.)"""
    import uvicorn

    check_port(port)
    served = Server(engine, options or ServerOptions())

    class GracefulServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            timer = asyncio.get_running_loop().call_later(
                shutdown_timeout, served.loop.cancel_all,
                f"the server shut down before this request finished (--shutdown-timeout {shutdown_timeout:g} s); "
                f"send it again to a server that runs")
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    return GracefulServer(uvicorn.Config(served.app(), host=host, port=port, log_level=log_level, lifespan="on",
                                         timeout_graceful_shutdown=shutdown_timeout + SHUTDOWN_GRACE))


def run(engine: Engine, options: ServerOptions | None = None, *, host: str = "127.0.0.1", port: int = 8000,
        shutdown_timeout: float = 10.0, log_level: str = "info") -> None:
    """Serve until SIGTERM or Ctrl-C. On SIGTERM: stop accepting connections, let running responses
    finish for up to ``shutdown_timeout`` seconds, cancel what is left (see `make_server`), return."""
    server = make_server(engine, options, host=host, port=port, shutdown_timeout=shutdown_timeout,
                         log_level=log_level)
    # uvicorn shuts down on SIGTERM, then raises the signal again for the handler it found: make that a
    # no-op, so a SIGTERM ends the process with exit status 0 after the graceful shutdown.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot listen (it logged why)
        if server.started:
            raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not server.started:
        raise OSError(f"could not serve on {host}:{port} (see the message above); choose another --port or --host")
