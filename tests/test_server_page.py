"""The page at / in headless Chromium (the Debian package `chromium`; skipped without it): it lists
the adapters, streams the base model's answer beside each adapter's, and those answers are the
server's own. The screenshot is kept in pytest's tmp folder to look at."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest

from test_server import NEW, TEXTS, new_engine, serving
from test_serving import PEFT_ADAPTERS, save_peft

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (apt-get install chromium)")


def _chromium(*args: str, budget_ms: int = 5000) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1100,700",
                           f"--virtual-time-budget={budget_ms}", *args], capture_output=True, text=True, timeout=90)


def test_the_page_shows_the_base_answer_beside_each_adapters(tmp_path) -> None:
    engine = new_engine()
    for seed, name in ((1, "qv"), (2, "all")):
        engine.add_adapter(name, save_peft(tmp_path / name, seed, **PEFT_ADAPTERS[name]))
    with serving(engine) as running:
        url = f"{running.url}/?prompt={quote(TEXTS[0])}&max_tokens={NEW}&chat=0&run"
        # Chromium dumps the DOM when its virtual time runs out, which does not wait for the streams:
        # a dump may come before a panel's first token. Dump again until every panel shows one.
        for _ in range(10):
            dom = _chromium("--dump-dom", url).stdout
            if all(text for _, text in re.findall(r'<div class="answer"><h3>(.*?)</h3><pre>(.*?)</pre>', dom)):
                break
        shot = Path(os.environ.get("LORAKIT_PAGE_SHOT", tmp_path / "page.png"))
        _chromium(f"--screenshot={shot}", url)
        client = running.client()
        want = {m: client.completions.create(model=m, prompt=TEXTS[0], max_tokens=NEW, temperature=0).choices[0].text
                for m in ("base", "qv", "all")}
    panels = re.findall(r'<div class="answer"><h3>(.*?)</h3><pre>(.*?)</pre>', dom)
    assert [html.unescape(title) for title, _ in panels] == ["base: the base model", "qv", "all"], dom[-2000:]
    # what each panel shows by the dump (maybe mid-stream) is a non-empty start of the server's
    # answer (the screenshot was looked at by hand)
    for model, (_, text) in zip(("base", "qv", "all"), panels):
        assert text and want[model].startswith(html.unescape(text)), (model, text, want[model])
    assert len(set(want.values())) == 3  # the adapters change the answer
    assert shot.stat().st_size > 10_000
