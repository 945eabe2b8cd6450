"""The page at / in headless Chromium (the Debian package `chromium`; skipped without it): it lists
the adapters, streams the base model's answer beside each adapter's, and those answers are the
server's own. The screenshot is kept in pytest's tmp folder to look at.

Chromium is driven over its DevTools pipe (`--remote-debugging-pipe`: JSON messages ending in a NUL
byte on file descriptors 3 and 4), so the test waits for the page to say "done" instead of guessing
how long the streams take: `--dump-dom` dumps when its virtual time runs out, which does not wait
for a streamed response, and on a busy machine an answer's first token can come after it."""

from __future__ import annotations

import base64
import fcntl
import html
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from test_server import NEW, TEXTS, new_engine, serving
from test_serving import PEFT_ADAPTERS, save_peft

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (apt-get install chromium)")


class DevTools:
    """One headless Chromium with one page, spoken to over the DevTools pipe."""

    def __init__(self, url: str) -> None:
        theirs_in, self._to_chromium = os.pipe()      # (read end, write end)
        self._from_chromium, theirs_out = os.pipe()
        # Chromium reads commands from fd 3 and writes replies to fd 4: move the pipe ends there in
        # the child (through fds above 10, so that neither move overwrites the other's source)
        high_in, high_out = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (theirs_in, theirs_out))

        def plumb() -> None:
            os.dup2(high_in, 3)
            os.dup2(high_out, 4)

        self._process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1100,700",
             "--remote-debugging-pipe", url],
            preexec_fn=plumb, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in (theirs_in, theirs_out, high_in, high_out):
            os.close(fd)
        self._next_id, self._buffer = 0, b""
        pages = [t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page"]
        self._session = self.call("Target.attachToTarget", targetId=pages[0]["targetId"], flatten=True)["sessionId"]

    def call(self, method: str, session: bool = False, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self._session
        os.write(self._to_chromium, json.dumps(message).encode() + b"\0")
        while True:   # events come in between; the reply is the message with our id
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_chromium, 1 << 16)
                assert chunk, "Chromium closed its DevTools pipe"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:
                assert "error" not in reply, reply
                return reply["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 90.0):
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            assert time.monotonic() < deadline, f"the page never made {expression!r} true"
            time.sleep(0.1)
        return value

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", session=True)["data"]))

    def close(self) -> None:
        self._process.kill()
        self._process.wait(timeout=30)
        os.close(self._to_chromium)
        os.close(self._from_chromium)


def test_the_page_shows_the_base_answer_beside_each_adapters(tmp_path) -> None:
    engine = new_engine()
    for seed, name in ((1, "qv"), (2, "all")):
        engine.add_adapter(name, save_peft(tmp_path / name, seed, **PEFT_ADAPTERS[name]))
    shot = Path(os.environ.get("LORAKIT_PAGE_SHOT", tmp_path / "page.png"))
    with serving(engine) as running:
        browser = DevTools(f"{running.url}/?prompt={quote(TEXTS[0])}&max_tokens={NEW}&chat=0&run")
        try:
            status = browser.wait_for('document.getElementById("status").textContent.match(/^(done|[A-Z]\\w*Error.*)$/)?.[0]')
            answers = browser.evaluate('document.getElementById("answers").innerHTML')
            browser.screenshot(shot)
        finally:
            browser.close()
        client = running.client()
        want = {m: client.completions.create(model=m, prompt=TEXTS[0], max_tokens=NEW, temperature=0).choices[0].text
                for m in ("base", "qv", "all")}
    assert status == "done", status
    panels = re.findall(r'<div class="answer"><h3>(.*?)</h3><pre>(.*?)</pre><div class="meta">(.*?)</div>', answers)
    assert [html.unescape(title) for title, _, _ in panels] == ["base: the base model", "qv", "all"], answers
    # each panel streamed the server's whole greedy answer, and says how it ended
    for model, (_, text, meta) in zip(("base", "qv", "all"), panels):
        assert html.unescape(text) == want[model], (model, text, want[model])
        assert re.fullmatch(rf"{NEW} tokens in \d+\.\d\d s, finish: length", meta), meta
    assert len(set(want.values())) == 3  # the adapters change the answer
    assert shot.stat().st_size > 10_000
