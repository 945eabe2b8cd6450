"""The engine's own thread: the one place that touches the `Engine` while `lorakit serve` runs.

The engine is synchronous and not thread-safe, and the HTTP handlers run on an asyncio event loop.
So one thread owns the engine: it takes commands from a queue (start a job, cancel one, run a
function such as `add_adapter`), always between steps, and steps the engine while anything waits
or runs. Results go back to the event loop with ``loop.call_soon_threadsafe``: a job's ``accepted``
future (its prompt's token count, or the error that refused it), then, for a stream, each step's
`Event` on its ``events`` queue, and at the end its ``done`` future (a `Finished`).

The tokenizer is used on this thread only (the prompt is encoded here, and the engine decodes here),
since a Rust tokenizer shared by two threads can refuse a call ("Already borrowed").
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .engine import Engine
from .request import Event, Request, TokenLogprob
from .server_api import ApiError
from .server_metrics import ServerMetrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finished:
    """How a job ended: its whole text, its token count and OpenAI's finish reason."""

    text: str
    completion_tokens: int
    finish_reason: str
    logprobs: list[dict] = field(default_factory=list)  # `EngineLoop.pieces` of every token, if asked


@dataclass(eq=False)
class Job:
    """One HTTP request's generation. Made by a handler; its engine-side fields (``request``,
    ``last_token``) are the engine thread's alone."""

    encode: Callable[[Any], list[int]]   # tokenizer -> prompt ids; runs on the engine thread
    adapter: str | None                  # None: the base model
    label: str                           # the model name the client sent (for metrics)
    max_tokens: int | None               # None: as many as the context leaves
    options: dict                        # more keywords of Engine.submit
    stream: bool
    loop: asyncio.AbstractEventLoop
    prompt_field: str = "prompt"         # the body's field that holds the prompt ("messages" for chat)
    accepted: asyncio.Future = field(init=False)
    done: asyncio.Future = field(init=False)
    events: asyncio.Queue = field(init=False)
    arrived: float = field(default_factory=time.monotonic)
    request: Request | None = None
    last_token: float | None = None
    series: tuple | None = None          # its label's (ttft, inter_token, generation_tokens) metric children
    scored: int = 0                      # tokens whose log-probabilities have gone out (streams)

    def __post_init__(self) -> None:
        self.accepted, self.done = self.loop.create_future(), self.loop.create_future()
        self.events = asyncio.Queue()


def _settle(future: asyncio.Future, value: Any) -> None:
    """On the event loop: resolve ``future`` with ``value`` (an exception is raised from it)."""
    if future.done():
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)


def _run_all(calls: list) -> None:
    """On the event loop: a step's deliveries, in order."""
    for fn, args in calls:
        fn(*args)


class EngineLoop:
    """Runs ``engine`` on a thread of its own (see the module's docstring). At most ``max_pending``
    jobs are accepted and not yet ended (running and waiting); one more is refused with a 503."""

    def __init__(self, engine: Engine, metrics: ServerMetrics, *, max_pending: int) -> None:
        self.engine, self.metrics, self.max_pending = engine, metrics, max_pending
        self.adapters: tuple[str, ...] = tuple(engine.adapters)  # replaced (never changed) by the engine thread
        self.stopping = False
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: dict[int, Job] = {}           # request id -> job; the engine thread's
        self._pending = 0                         # accepted by a handler, not ended yet
        self._lock = threading.Lock()             # guards _pending and stopping
        self._in_slots = self._slotted()
        self._outbox: list | None = None          # during a step: deliveries sent in one wake-up per loop
        self._thread = threading.Thread(target=self._run, name="lorakit-engine", daemon=True)
        metrics.adapters.set(len(self.adapters))

    # --- from the event loop -----------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self.stopping

    def submit(self, job: Job) -> None:
        with self._lock:
            if self.stopping:
                raise ApiError(503, "the server is shutting down; send the request to another server",
                               headers={"Retry-After": "5"})
            if self._pending >= self.max_pending:
                raise ApiError(503, f"the server is busy: {self._pending} requests are running or waiting, its "
                                    f"limit (--max-queue plus --max-batch); try again shortly",
                               code="server_overloaded", headers={"Retry-After": "1"})
            self._pending += 1
        self._inbox.put(("submit", job))

    def cancel(self, job: Job) -> None:
        """End ``job`` now (its client left); a job that has ended already is left alone."""
        self._inbox.put(("cancel", job))

    def cancel_all(self, message: str) -> None:
        """Refuse new jobs and end every accepted one with a 503 saying ``message`` (their clients get
        it as an error body, or a stream's error event); the thread goes on, for `stop`."""
        with self._lock:
            self.stopping = True
        self._inbox.put(("cancel_all", message))

    async def call(self, fn: Callable[[Engine], Any]) -> Any:
        """``fn(engine)`` on the engine thread, between steps: its result, or its exception raised here."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._inbox.put(("call", (fn, future, loop)))
        return await future

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every job (their clients get a 503 or an error event) and end the thread."""
        with self._lock:
            self.stopping = True
        self._inbox.put(("stop", None))
        self._thread.join(timeout)

    # --- the engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while True:
            busy = bool(engine.running or engine.waiting)
            try:
                command = self._inbox.get(block=not busy)
            except queue.Empty:
                command = None
            while command is not None:  # every command that came in, then one step
                kind, item = command
                if kind == "stop":
                    self._cancel_all("the server shut down before this request finished")
                    return
                getattr(self, f"_{kind}")(item)
                try:
                    command = self._inbox.get_nowait()
                except queue.Empty:
                    command = None
            if engine.running or engine.waiting:
                self._step()

    def _submit(self, job: Job) -> None:
        try:
            ids = job.encode(self.engine.tokenizer)
            max_new = self._room(job, len(ids))
            request = self.engine.submit(ids, job.adapter, max_new_tokens=max_new, **job.options)
        except Exception as e:  # noqa: BLE001 - every refusal goes back to its client
            self._refuse(job, e)
            return
        job.request = request
        m = self.metrics  # a child per label, looked up once: every token of every request is recorded
        job.series = (m.ttft.labels(job.label), m.inter_token.labels(job.label), m.generation_tokens.labels(job.label))
        self._jobs[request.id] = job
        self.metrics.prompt_tokens.labels(job.label).inc(len(ids))
        self._gauges()
        self._send(job.accepted, len(ids))

    def _room(self, job: Job, n_prompt: int) -> int:
        """max_new_tokens for ``job``'s prompt of ``n_prompt`` tokens; 400 when it cannot fit the context.
        A prefix-tuned adapter's n_prefix virtual tokens go in front of the prompt and take context too."""
        field, max_tokens, one = job.prompt_field, job.max_tokens, job.prompt_field == "prompt"
        what = "the prompt" if one else "the messages (through the chat template)"
        if n_prompt == 0:
            raise ApiError(400, f"{what} {'is' if one else 'are'} empty: no tokens to continue from; send some text",
                           param=field)
        prefix = self.engine.prefixes.get(job.adapter)
        n_prefix = 0 if prefix is None else prefix.shape[0]
        taken = n_prompt + n_prefix
        has = f"{what} {'has' if one else 'have'} {n_prompt} tokens" + (
            f" and adapter {job.adapter!r} puts {n_prefix} prefix tokens (its n_prefix) in front: {taken}"
            if n_prefix else "")
        limit = self.engine.max_seq_len  # the last new token is never fed back: taken + max_tokens - 1 positions
        if taken > limit:
            raise ApiError(400, f"{has}, over the server's context of {limit} tokens (--max-seq-len): shorten "
                                f"the {field}", param=field, code="context_length_exceeded")
        if max_tokens is None:
            return limit - taken + 1
        if taken + max_tokens - 1 > limit:
            raise ApiError(400, f"{has}; with max_tokens={max_tokens} that needs {taken + max_tokens - 1} positions, "
                                f"over the server's context of {limit} (--max-seq-len): lower max_tokens to "
                                f"{limit - taken + 1} or less, or shorten the {field}", param="max_tokens",
                           code="context_length_exceeded")
        return max_tokens

    def _refuse(self, job: Job, error: Exception) -> None:
        if not isinstance(error, ApiError):
            if isinstance(error, KeyError):  # its adapter was unloaded after the handler looked
                error = ApiError(404, f"the model {job.label!r} does not exist (any more); GET /v1/models lists "
                                      f"what this server has", param="model", code="model_not_found")
            elif isinstance(error, (ValueError, TypeError)):
                error = ApiError(400, str(error))
            else:
                logger.exception("refusing a request after an unexpected error")
                error = ApiError(500, f"the server failed to start this request ({type(error).__name__}); "
                                      f"see the server's log")
        with self._lock:
            self._pending -= 1
        self._send(job.accepted, error)

    def _cancel(self, job: Job) -> None:
        request = job.request
        if request is None or self._jobs.get(request.id) is not job:
            return  # refused, or ended already
        self.engine.cancel(request)
        self._end(job, Finished(request.text, len(request.tokens), "cancelled"))
        self._gauges()

    def _call(self, item) -> None:
        fn, future, loop = item
        try:
            result = fn(self.engine)
        except Exception as e:  # noqa: BLE001 - the caller decides what it means
            result = e
        self.adapters = tuple(self.engine.adapters)
        self.metrics.adapters.set(len(self.adapters))
        self._in_slots = self._slotted()
        try:
            loop.call_soon_threadsafe(_settle, future, result)
        except RuntimeError:  # the event loop is closed: nobody waits any more
            pass

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception:  # a bug, or out of memory: end the requests the engine held, keep serving
            logger.exception("an engine step failed; its requests are cancelled")
            self._cancel_all("the engine failed while generating this request; see the server's log", status=500)
            return
        now = time.monotonic()
        self._outbox = []
        try:
            for event in events:
                job = self._jobs.get(event.request_id)
                if job is not None:
                    self._record(job, event, now)
        finally:
            self._flush()
        self._gauges()
        self._count_evictions()

    def _gauges(self) -> None:
        """The batch's gauges, after anything that changes it (a step, a submit, a cancel)."""
        self.metrics.queue_depth.set(len(self.engine.waiting))
        self.metrics.running.set(len(self.engine.running))

    def _record(self, job: Job, event: Event, now: float) -> None:
        if event.tokens:
            ttft, inter_token, generated = job.series
            if job.last_token is None:
                ttft.observe(now - job.arrived)
            else:
                inter_token.observe(now - job.last_token)
            job.last_token = now
            generated.inc(len(event.tokens))
        if job.stream:
            self._put(job, (event, self.pieces(self._released_logprobs(job, event.finished))))
        if event.finished:
            request = job.request
            self._end(job, Finished(request.text, len(request.tokens), event.finish_reason,
                                    [] if job.stream else self.pieces(self._released_logprobs(job, True))))

    @staticmethod
    def _released_logprobs(job: Job, final: bool) -> list[TokenLogprob]:
        """``job``'s token log-probabilities not sent yet, up to the last token of the text released
        so far: they go out with their text, and the tokens of a stop string (cut from the text) never
        do. Once it ends other than by a stop string, every token's (some render no text)."""
        request, text = job.request, job.request.detokenizer
        if request.top_logprobs is None:
            return []
        if text is None or (final and not text.stopped):
            kept = len(request.logprobs)
        else:
            kept = text.tokens_for(len(text.text))
        new, job.scored = request.logprobs[job.scored:kept], max(job.scored, kept)
        return new

    def pieces(self, logprobs: list) -> list[dict]:
        """`request.TokenLogprob`s with their tokens as text (decoded here: the tokenizer is this
        thread's): {"token", "logprob", "top": {text: logprob}}."""
        tok = self.engine.tokenizer
        text = (lambda t: tok.decode([t])) if tok is not None else str
        return [{"token": text(lp.token), "logprob": lp.logprob, "top": {text(t): v for t, v in lp.top}}
                for lp in logprobs]

    def _end(self, job: Job, result: Finished | ApiError) -> None:
        del self._jobs[job.request.id]
        with self._lock:
            self._pending -= 1
        reason = result.finish_reason if isinstance(result, Finished) else "cancelled"
        self.metrics.requests.labels(job.label, reason).inc()
        if job.stream and isinstance(result, ApiError):
            self._put(job, result)
        self._send(job.done, result)

    def _cancel_all(self, message: str, status: int = 503) -> None:
        self.engine.cancel_all()  # also what a failed step may have left half-done
        for job in list(self._jobs.values()):
            self._end(job, ApiError(status, message))
        self._gauges()

    def _slotted(self) -> set[str]:
        return {name for name, entry in self.engine.bank.entries.items() if entry.slot is not None}

    def _count_evictions(self) -> None:
        now = self._slotted()
        evicted = len((self._in_slots - now) & set(self.engine.bank.entries))
        if evicted:
            self.metrics.adapter_evictions.inc(evicted)
        self._in_slots = now

    def _send(self, future: asyncio.Future, value: Any) -> None:
        self._deliver(future.get_loop(), _settle, future, value)

    def _put(self, job: Job, item: Event | ApiError) -> None:
        self._deliver(job.loop, job.events.put_nowait, item)

    def _deliver(self, loop: asyncio.AbstractEventLoop, fn: Callable, *args) -> None:
        """Run ``fn(*args)`` on ``loop``: now, or with the rest of this step's deliveries (one wake-up of
        the event loop per step instead of one per request: with many streams that is most of the
        server's own cost)."""
        if self._outbox is not None:
            self._outbox.append((loop, fn, args))
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody waits any more
            pass

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox or [], None
        loops: dict[asyncio.AbstractEventLoop, list] = {}
        for loop, fn, args in outbox:
            loops.setdefault(loop, []).append((fn, args))
        for loop, calls in loops.items():
            try:
                loop.call_soon_threadsafe(_run_all, calls)
            except RuntimeError:
                pass
