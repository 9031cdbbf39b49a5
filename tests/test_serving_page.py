"""The page at `/` in a real browser: headless Chromium (Debian's `chromium`, installed by .ci/run) loads it from a
live server, runs a prompt, and the final text of the sample appears in the page."""

from __future__ import annotations

import html.parser
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlencode

import pytest
from test_serving import LiveServer, checkpoint  # noqa: F401  (the module fixture)

pytest.importorskip("fastapi")
pytest.importorskip("openai")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install chromium; .ci/run does)")


def chromium(url: str, profile: Path, *flags: str, timeout: int = 60) -> subprocess.CompletedProcess:
    """Headless Chromium on `url`, no network but localhost, a fresh profile; `--virtual-time-budget` lets the
    page's fetches and scripts run before the DOM is dumped or the screenshot taken."""
    return subprocess.run(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--virtual-time-budget=30000", *flags, url,
        ],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


class Sample(html.parser.HTMLParser):
    """The `#sample` element of a dumped DOM: its `data-done` flag and the text of its `final` span."""

    def __init__(self) -> None:
        super().__init__()
        self.done, self.final, self.inside = False, None, False

    def handle_starttag(self, tag, attrs) -> None:
        attrs = dict(attrs)
        if attrs.get("id") == "sample":
            self.done = attrs.get("data-done") == "1"
        self.inside = attrs.get("class") == "final"
        if self.inside:
            self.final = ""

    def handle_endtag(self, tag) -> None:
        self.inside = False

    def handle_data(self, data) -> None:
        if self.inside:
            self.final += data


def test_the_page_shows_the_final_sample(checkpoint, tmp_path) -> None:  # noqa: F811
    import openai

    live = LiveServer(checkpoint)
    try:
        settings = {"prompt": "w5 w6", "steps": 6, "max_tokens": 6, "seed": 7, "schedule": "linear"}
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", timeout=30, max_retries=0)
        expected = (
            client.completions.create(
                model="tiny-elastic", prompt="w5 w6", max_tokens=6, seed=7, extra_body={"num_steps": 6}
            )
            .choices[0]
            .text
        )
        url = f"{live.url}/?{urlencode({**settings, 'run': 1})}"
        dumped = chromium(url, tmp_path / "profile", "--dump-dom")
        assert dumped.returncode == 0, dumped.stderr[-2000:]
        sample = Sample()
        sample.feed(dumped.stdout)
        assert sample.done and sample.final == expected and expected
        shot = tmp_path / "page.png"
        chromium(url, tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1000,760")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        live.stop()
