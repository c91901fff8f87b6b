"""The playground page (GET /) in a real headless browser: it streams drafts, shows the answer and server errors.

Needs Debian's /usr/bin/chromium, node, and playwright-core in tests/browser/node_modules (installed here with
npm on first use; playwright-core never downloads a browser). Skips with the reason when any is missing.
The screenshot of the finished run is kept at tests/browser/artifacts/playground.png.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from test_serving import RunningServer

BROWSER_DIR = Path(__file__).parent / "browser"
ARTIFACTS = BROWSER_DIR / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
API_KEY = "sesame"  # the page must send it as `Authorization: Bearer sesame`


def _install_playwright_core() -> str | None:
    """Why the browser tests cannot run, or None when they can (npm-installing playwright-core once if needed)."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is not installed"
    if shutil.which("node") is None:
        return "node is not installed"
    module = BROWSER_DIR / "node_modules" / "playwright-core"
    if not module.is_dir():
        npm = shutil.which("npm")
        if npm is None:
            return "playwright-core is missing and npm is not installed"
        env = dict(os.environ, PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD="1")
        try:
            subprocess.run([npm, "install", "--prefix", str(BROWSER_DIR), "--no-audit", "--no-fund",
                            "--no-package-lock"], env=env, capture_output=True, timeout=180, check=False)
        except subprocess.TimeoutExpired:
            pass
        if not module.is_dir():
            return f"could not npm-install playwright-core into {BROWSER_DIR / 'node_modules'}"
    return None


@pytest.fixture(scope="module")
def node():
    reason = _install_playwright_core()
    if reason:
        pytest.skip(reason)
    return shutil.which("node")


@pytest.fixture(scope="module")
def server(text_model_dir):
    # canvas_length is 8 for this model, so 24 tokens are up to three canvases.
    running = RunningServer(text_model_dir, api_key=API_KEY, max_sequences=2, max_prompt_tokens=256, max_tokens=64)
    yield running
    running.stop()


def drive(node: str, url: str, screenshot: Path, **options) -> dict:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([node, str(BROWSER_DIR / "playground.mjs"), url, str(screenshot), json.dumps(options)],
                          cwd=BROWSER_DIR, env=env, capture_output=True, text=True, timeout=120)
    lines = done.stdout.strip().splitlines()
    assert lines, f"no summary from the browser driver (exit {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(lines[-1])


def test_page_is_served(server):
    response = httpx.get(server.url + "/")  # the page itself needs no API key
    assert response.status_code == 200 and "text/html" in response.headers["content-type"]
    assert 'id="canvas"' in response.text and "include_drafts" in response.text


def test_playground_streams_drafts_and_shows_the_answer(node, server):
    screenshot = ARTIFACTS / "playground.png"
    result = drive(node, server.url + "/", screenshot, prompt="Tell me about the sea.", maxTokens=24, steps=3,
                   entropyBound=0.5, seed=7, apiKey=API_KEY)
    print(f"screenshot: {screenshot}\nsummary: {json.dumps(result)}")
    assert result["error"] is None and not result["pageErrors"], result
    assert result["state"] == "done"
    # 24 tokens in canvases of 8 with 3 steps each: up to 9 drafts (fewer if EOS ends it early).
    assert 3 <= result["drafts"] <= 9
    observed = result["observed"]
    assert observed["renders"] >= 1 and observed["maxSpans"] == 8
    assert observed["accepted"] and observed["pending"], observed
    layout = result["layout"]  # this tokenizer's pieces include " x", "\r", "\x1e" and ""
    assert layout["spans"] >= 8 and layout["blank"] == 0 and layout["maxHeight"] < 30, layout
    assert "denoising steps" in result["summary"] and result["status"].startswith("done")
    # The page's answer is exactly the server's non-streamed answer for the same seeded request.
    body = {"messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": 24,
            "max_denoising_steps": 3, "entropy_bound": 0.5, "seed": 7}
    whole = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60,
                       headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert result["answer"] == whole["choices"][0]["message"]["content"] != ""
    data = screenshot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_playground_completion_mode(node, server):
    result = drive(node, server.url + "/", ARTIFACTS / "playground-completion.png", mode="completion",
                   prompt="It is a truth", maxTokens=16, steps=2, seed=3, apiKey=API_KEY)
    assert result["state"] == "done" and result["error"] is None and result["drafts"] >= 2, result
    whole = httpx.post(server.url + "/v1/completions", timeout=60, headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"prompt": "It is a truth", "max_tokens": 16, "max_denoising_steps": 2, "seed": 3}).json()
    assert result["answer"] == whole["choices"][0]["text"]


def test_playground_shows_the_servers_error(node, server):
    result = drive(node, server.url + "/", ARTIFACTS / "playground-error.png", prompt="Hi", maxTokens=1000,
                   apiKey=API_KEY)
    assert result["state"] == "error" and result["drafts"] == 0
    assert "exceeds this server's limit of 64" in result["error"], result


def test_playground_shows_a_missing_api_key(node, server):
    result = drive(node, server.url + "/", ARTIFACTS / "playground-auth.png", prompt="Hi", maxTokens=8)
    assert result["state"] == "error" and "API key" in result["error"], result


def test_playground_shows_an_error_that_arrives_mid_stream(node, text_model_dir):
    # A short time limit and many steps: drafts stream first, then the server sends an SSE `{"error": ...}`.
    running = RunningServer(text_model_dir, max_sequences=1, max_tokens=64, timeout=0.5)
    try:
        result = drive(node, running.url + "/", ARTIFACTS / "playground-timeout.png", prompt="Go on", maxTokens=64,
                       steps=400, seed=1)
    finally:
        running.stop()
    assert result["state"] == "error" and result["drafts"] > 0, result
    assert "time limit" in result["error"], result
