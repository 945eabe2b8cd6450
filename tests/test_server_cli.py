"""`lorakit serve` as a process: it serves a local model, says which flag is wrong, and a SIGTERM
ends it cleanly (exit status 0) after the running requests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from test_cli import model_dir  # noqa: F401 - the tiny local Llama (its tokenizer has a chat template)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LORAKIT_API_KEY": ""}
    return subprocess.Popen([sys.executable, "-m", "lorakit", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def _wait_healthy(process: subprocess.Popen, url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("the server did not become healthy")


def test_serve_answers_and_a_sigterm_ends_it_with_status_0(model_dir, tmp_path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = _serve("--model", str(model_dir), "--port", str(port), "--device", "cpu", "--max-batch", "2",
                     "--adapter-dir", str(tmp_path), "--shutdown-timeout", "5")
    try:
        _wait_healthy(process, url)
        models = httpx.get(url + "/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["base"]
        answer = httpx.post(url + "/v1/chat/completions", json={"model": "base", "max_tokens": 4, "temperature": 0,
                                                                "messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
        with httpx.stream("POST", url + "/v1/completions", json={"model": "base", "prompt": "name", "stream": True,
                                                                  "max_tokens": 200, "ignore_eos": True}) as stream:
            lines = stream.iter_lines()
            next(lines)
            process.send_signal(signal.SIGTERM)   # while a stream runs: it finishes (or is cut at the timeout)
            rest = list(lines)
        events = [line for line in rest if line]
        assert events[-1] == "data: [DONE]" or any('"error"' in line for line in events)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    out = process.stdout.read()
    assert "serving 'base'" in out and "Traceback" not in out


def test_serve_errors_name_the_flag(model_dir, tmp_path, capsys) -> None:
    from lorakit.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, words in ((["--adapter", "no-name"], "--adapter no-name: give it as NAME=PATH"),
                            (["--adapter", "base=x"], "--served-model-name"),
                            (["--adapter", f"a={tmp_path}"], f"--adapter a={tmp_path}: "),
                            (["--adapter-dir", str(tmp_path / "nope")], "--adapter-dir"),
                            (["--max-batch", "0"], "--max-batch 0"),
                            (["--port", str(port)], "choose another --port")):
            assert main(["serve", "--model", str(model_dir), "--device", "cpu", "--port", str(port), *args]) == 2
            err = capsys.readouterr().err
            assert words in err, (args, err)


@pytest.mark.parametrize("args, flag", [(["--port", "83641"], "--port"), (["--api-key", ""], "--api-key")],
                         ids=["port-past-65535", "empty-api-key"])
def test_serve_refuses_a_port_past_65535_and_an_empty_api_key(model_dir, args, flag) -> None:
    """Both used to serve: on port 83641 % 65536, and with no authentication at all."""
    process = _serve("--model", str(model_dir), "--device", "cpu", "--port", str(_free_port()), *args)
    try:
        out, _ = process.communicate(timeout=60)  # one that serves anyway is ended by the timeout, failing
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 2 and "lorakit serve: error:" in out and flag in out, out
    assert "Uvicorn running" not in out and "serving 'base'" not in out  # refused before the model loads


@pytest.mark.parametrize("flag", ["--api-key", "--adapter-dir", "--served-model-name", "--max-queue"])
def test_serve_help_shows_the_options(flag) -> None:
    from lorakit.cli import build_parser

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["serve"]
    assert flag in sub.format_help()
