"""`lorakit serve` under load: HTTP throughput and latency against the same engine run offline.

One process: a Llama of ``--shape`` (seeded random weights; a word-level tokenizer of its vocabulary
so the server streams text), ``--adapters`` PEFT adapters (r=16 all-linear, random factors; the
requests take them round robin, every ``--base-every``-th on the base model), one `Engine`.

1. Offline: ``engine.generate`` of the whole workload (``--requests`` prompts of ``--prompt-len``
   token ids, ``--new-tokens`` tokens each, greedy, ``ignore_eos``): output tokens/s.
2. Served: the same engine behind `lorakit.serving.server` (uvicorn on 127.0.0.1, a free port), and
   for each ``--clients`` level, that many concurrent clients (httpx, streaming completions, in a
   load-generator process of their own) sending the same workload: output tokens/s, time to first token and inter-token latency
   p50/p90/p99 (from the client's side: each streamed chunk's arrival), and the server's
   throughput over the offline one.

    .venv/bin/python benchmarks/serve_load.py --shape tiny --requests 32 --prompt-len 16 \\
        --new-tokens 16 --clients 1,8,32 --out /tmp/serve_load_smoke.json      # smoke test
    python benchmarks/serve_load.py --device cuda --shape tinyllama --requests 64 --clients 1,8,32,64

Writes ``benchmarks/results/serve_load_<device>.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import importlib.util
import json
import multiprocessing
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from lorakit.cli import HelpFormatter  # the defaults shown once, None ones not at all

sys.path.insert(0, str(Path(__file__).parent))
from serving import SHAPES, build_model, percentiles, save_adapters  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def stack(args) -> dict:
    """What served the requests: uvicorn's event loop and HTTP parser (its "auto" takes uvloop and
    httptools when they are installed), and the GIL switch interval while serving."""
    from lorakit.serving.server import ServerOptions

    have = lambda name: importlib.util.find_spec(name) is not None  # noqa: E731
    return {"loop": "uvloop" if args.loop == "auto" and have("uvloop") else "asyncio" if args.loop == "auto" else args.loop,
            "http": "httptools" if args.http == "auto" and have("httptools") else "h11" if args.http == "auto" else args.http,
            "gil_switch_interval": ServerOptions().gil_switch_interval if args.gil_switch_interval == "default"
            else args.gil_switch_interval}


def word_tokenizer(vocab: int):
    """A tokenizer of ``vocab`` whole words ``w0 w1 ...`` (id = index): the server's text path
    (incremental decoding, stop strings) runs as it would with a real tokenizer, on random ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")


class Served:
    """The server in a thread on a free 127.0.0.1 port; `stop` shuts it down gracefully."""

    def __init__(self, engine, *, loop: str = "auto", http: str = "auto", gil_switch_interval="default") -> None:
        import uvicorn

        from lorakit.serving.server import ServerOptions, make_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        options = ServerOptions(max_queue=4096)
        if gil_switch_interval != "default":
            options = dataclasses.replace(options, gil_switch_interval=gil_switch_interval)
        app = make_app(engine, options)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", loop=loop, http=http)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


async def load(url: str, work: list[tuple[list[int], str]], clients: int, new_tokens: int) -> dict:
    """``clients`` concurrent streaming clients over ``work`` (prompt ids, model): per request the
    chunk arrival times; throughput over the whole level."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for item in work:
        queue.put_nowait(item)
    ttft, itl, tokens, failures = [], [], 0, []

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            ids, model = queue.get_nowait()
            body = {"model": model, "prompt": ids, "max_tokens": new_tokens, "temperature": 0, "stream": True,
                    "ignore_eos": True, "stream_options": {"include_usage": True}}
            sent = time.perf_counter()
            stamps = []
            async with http.stream("POST", "/v1/completions", json=body) as answer:
                if answer.status_code != 200:
                    failures.append(f"{answer.status_code}: {(await answer.aread())[:200]!r}")
                    continue
                async for line in answer.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        stamps.append(time.perf_counter())
                    if chunk.get("usage") and not chunk.get("choices"):
                        tokens += chunk["usage"]["completion_tokens"]
            if stamps:
                ttft.append(stamps[0] - sent)
                itl.extend(b - a for a, b in zip(stamps, stamps[1:]))

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    return {"clients": clients, "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_s": percentiles(ttft), "inter_token_s": percentiles(itl), "failures": failures[:5],
            "failed": len(failures)}


def run_level(url: str, work: list, clients: int, new_tokens: int) -> dict:
    """One level in the load generator's own process (its clients do not share the server's GIL)."""
    return asyncio.run(load(url, work, clients, new_tokens))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shape", default="tinyllama", choices=list(SHAPES))
    p.add_argument("--requests", type=int, default=64, help="requests per level (and offline)")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--adapters", type=int, default=8, help="adapters the requests take round robin")
    p.add_argument("--base-every", type=int, default=4, help="every n-th request uses the base model (0: none)")
    p.add_argument("--max-batch", type=int, default=64, help="the engine's running batch")
    p.add_argument("--clients", type=lambda t: [int(x) for x in t.split(",") if x], default=[1, 8, 32, 64],
                   help="concurrency levels, comma-separated")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: 1 on CPU)")
    p.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"],
                   help="uvicorn's event loop (default: %(default)s: uvloop when installed)")
    p.add_argument("--http", default="auto", choices=["auto", "h11", "httptools"],
                   help="uvicorn's HTTP parser (default: %(default)s: httptools when installed)")
    p.add_argument("--gil-switch-interval", default="default",
                   help="seconds, 'none' (Python's own, 5 ms) or 'default' (ServerOptions' default) (default: %(default)s)")
    p.add_argument("--out", help="output JSON (default: benchmarks/results/serve_load_<device>.json)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no GPU")
    if args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32

    from lorakit.serving import Engine

    shape = SHAPES[args.shape]
    model = build_model(shape, args)
    tmp = tempfile.TemporaryDirectory(prefix="serve_load_")
    paths = save_adapters(model, args.adapters, Path(tmp.name))
    engine = Engine(model, word_tokenizer(shape.vocab), max_batch=args.max_batch, max_adapters=args.adapters,
                    max_rank=16, max_seq_len=args.prompt_len + args.new_tokens)
    names = [f"a{i}" for i in range(args.adapters)]
    for name, path in zip(names, paths):
        engine.add_adapter(name, path)
    g = torch.Generator().manual_seed(7)
    prompts = torch.randint(1, shape.vocab, (args.requests, args.prompt_len), generator=g).tolist()
    models = [None if args.base_every and i % args.base_every == 0 else names[i % len(names)]
              for i in range(args.requests)]

    engine.generate(prompts[:2], models[:2], max_new_tokens=2, ignore_eos=True)  # warm-up
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    engine.generate(prompts, models, max_new_tokens=args.new_tokens, ignore_eos=True)
    sync()
    offline_s = time.perf_counter() - start
    offline = {"wall_s": offline_s, "tokens_per_s": args.requests * args.new_tokens / offline_s}
    print(f"offline engine: {offline['tokens_per_s']:,.0f} tok/s", file=sys.stderr, flush=True)

    interval = "default" if args.gil_switch_interval == "default" else \
        None if args.gil_switch_interval == "none" else float(args.gil_switch_interval)
    served = Served(engine, loop=args.loop, http=args.http, gil_switch_interval=interval)
    levels = []
    generator = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    try:
        work = [(ids, m or "base") for ids, m in zip(prompts, models)]
        generator.submit(run_level, served.url, work[:2], 1, 2).result()  # warm-up through HTTP
        for clients in args.clients:
            level = generator.submit(run_level, served.url, work, clients, args.new_tokens).result()
            level["over_offline"] = level["tokens_per_s"] / offline["tokens_per_s"]
            levels.append(level)
            print(f"{clients} clients: {level['tokens_per_s']:,.0f} tok/s ({level['over_offline']:.3f}x offline)",
                  file=sys.stderr, flush=True)
    finally:
        generator.shutdown()
        served.stop()
        tmp.cleanup()

    out = Path(args.out or RESULTS / f"serve_load_{args.device}.json")
    payload = {"benchmark": "serve_load", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
               "torch": torch.__version__,
               "args": {k: str(v) if isinstance(v, torch.dtype) else v for k, v in vars(args).items()},
               "stack": stack(args), "offline": offline, "levels": levels}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(json.dumps(payload, indent=2) + "\n")
    tmp_out.replace(out)

    ms = lambda d, k: f"{d[k] * 1e3:,.1f}" if k in d else "-"  # noqa: E731
    print(f"\nlorakit serve, {args.device}, {args.shape} shape, {args.requests} requests × {args.prompt_len} prompt ids "
          f"× {args.new_tokens} new tokens, {args.adapters} adapters (base every {args.base_every})")
    head = f"{'clients':>7} {'tok/s':>10} {'×offline':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'failed':>6}"
    print(f"stack: {payload['stack']}")
    print(head + "\n" + "-" * len(head))
    print(f"{'offline':>7} {offline['tokens_per_s']:>10,.0f} {1.0:>9.3f}")
    for lv in levels:
        print(f"{lv['clients']:>7} {lv['tokens_per_s']:>10,.0f} {lv['over_offline']:>9.3f} {ms(lv['ttft_s'], 'p50'):>9} "
              f"{ms(lv['ttft_s'], 'p99'):>9} {ms(lv['inter_token_s'], 'p50'):>8} {ms(lv['inter_token_s'], 'p99'):>8} "
              f"{lv['failed']:>6}")
    print("latencies in ms, from the client's side; ×offline: the server's tokens/s over engine.generate's")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
