"""`dgemma serve` through the official `openai` client and raw HTTP: results, streaming, drafts, limits, errors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

import dgemma
from dgemma.serving.app import ServerSettings, create_app, serve, uvicorn_config
from dgemma.serving.service import ChoiceText, held_back
from dgemma.tokenizer import Tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, model_dir: Path, **settings):
        model = dgemma.load(model_dir)
        self.settings = ServerSettings(**{"port": free_port(), **settings})
        self.app = create_app(model, Tokenizer.from_directory(model_dir), self.settings)
        self.port = self.settings.port
        self.server = uvicorn.Server(uvicorn_config(self.app, self.settings, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0,
                             **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(text_model_dir):
    running = RunningServer(text_model_dir, max_sequences=4, max_queue=64, max_prompt_tokens=256, max_tokens=64)
    yield running
    running.stop()


def test_completion_and_chat_with_the_openai_client(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["dgemma"]
    out = client.completions.create(model="dgemma", prompt="It is a truth", max_tokens=12, seed=1)
    assert out.object == "text_completion" and out.choices[0].finish_reason in ("stop", "length")
    assert 0 < out.usage.completion_tokens <= 12 and out.usage.prompt_tokens > 0
    chat = client.chat.completions.create(model="dgemma", max_tokens=10, seed=2, messages=[
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}])
    assert chat.choices[0].message.role == "assistant" and isinstance(chat.choices[0].message.content, str)
    assert chat.usage.completion_tokens <= 10


def test_streamed_deltas_add_up_to_the_non_streamed_text(server):
    client = server.client()
    kwargs = dict(model="dgemma", max_tokens=20, seed=5, messages=[{"role": "user", "content": "Tell a story."}])
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


def test_drafts_stream_every_denoising_step(server):
    client = server.client()
    stream = client.chat.completions.create(model="dgemma", max_tokens=16, seed=3, stream=True,
                                            stream_options={"include_drafts": True},
                                            messages=[{"role": "user", "content": "Hello"}],
                                            extra_body={"max_denoising_steps": 3, "stability_threshold": None})
    chunks = list(stream)
    drafts = [c.model_extra["draft"] for c in chunks if c.model_extra.get("draft")]
    # 16 tokens = two canvases of 8, each denoised in exactly 3 steps
    assert [(d["canvas"], d["step"]) for d in drafts] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    assert all(len(d["tokens"]) == 8 == len(d["accepted"]) for d in drafts)
    assert all(c.choices[0].delta.content is None for c in chunks if c.model_extra.get("draft"))


def test_seeded_request_is_the_same_alone_batched_and_in_the_library(server, text_model_dir):
    client = server.client()
    prompt = "It is a truth universally"
    alone = client.completions.create(model="dgemma", prompt=prompt, max_tokens=24, seed=11).choices[0].text

    async def many():
        async_client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        requests = [async_client.completions.create(model="dgemma", prompt=prompt, max_tokens=24, seed=s)
                    for s in (11, 12, 13, 14, 15, 16)]
        return await asyncio.gather(*requests)

    batched = asyncio.run(many())
    assert batched[0].choices[0].text == alone
    assert len({r.choices[0].text for r in batched}) > 1  # other seeds give other texts
    model, tok = dgemma.load(text_model_dir), Tokenizer.from_directory(text_model_dir)
    ids = tok.encode(prompt)
    out = model.generate(torch.tensor([ids]), max_new_tokens=24, generator=torch.Generator().manual_seed(11))
    new = out.sequences[0, len(ids):].tolist()
    end = next((i for i, t in enumerate(new) if t == 1), len(new))
    assert tok.decode(new[:end]) == alone


def test_sixteen_concurrent_streams_all_complete(server):
    async def one(client, seed):
        stream = await client.completions.create(model="dgemma", prompt=f"Number {seed}", max_tokens=16, seed=seed,
                                                 stream=True)
        text, finish = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def run():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        return await asyncio.gather(*[one(client, s) for s in range(18)])

    results = asyncio.run(run())
    assert len(results) == 18 and all(finish in ("stop", "length") for _, finish in results)
    whole = server.client().completions.create(model="dgemma", prompt="Number 3", max_tokens=16, seed=3)
    assert results[3][0] == whole.choices[0].text


def test_n_choices_and_stop_strings(server):
    client = server.client()
    out = client.completions.create(model="dgemma", prompt="It is", max_tokens=32, seed=4, n=3)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    text = out.choices[0].text
    assert len(text) > 4
    stop = text[2:4]
    stopped = client.completions.create(model="dgemma", prompt="It is", max_tokens=32, seed=4, stop=[stop])
    assert stopped.choices[0].text == text[:text.find(stop)] and stopped.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="dgemma", prompt="It is", max_tokens=32, seed=4, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text[:text.find(stop)]


def test_disconnect_mid_stream_frees_the_slot(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json={"prompt": "Go on", "max_tokens": 64, "stream": True,
                                                          "stream_options": {"include_drafts": True}}) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    break
        # The connection is closed now; the engine drops the sequence at its next step.
        deadline = time.time() + 10
        while time.time() < deadline and http.get("/health").json()["running"]:
            time.sleep(0.05)
        assert http.get("/health").json()["running"] == 0


@pytest.mark.parametrize("body, status, fragment", [
    ('{"prompt": "x", ', 400, "not valid JSON"),
    ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"prompt": "x", "tools": [{"type": "function"}]}, 400, "`tools` is not supported"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "x", "max_tokens": 1000}, 400, "exceeds this server's limit of 64"),
    ({"prompt": "word " * 600}, 400, "at most 256"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "does not exist"),
    ({"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ({"prompt": "x", "max_denoising_steps": 0}, 400, "max_denoising_steps"),
    ({"prompt": "x", "t_min": 0.9, "t_max": 0.5}, 400, "t_max"),
])
def test_bad_requests_get_openai_shaped_4xx(server, body, status, fragment):
    data = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(server.url + "/v1/completions", content=data, headers={"content-type": "application/json"})
    assert response.status_code == status
    err = response.json()["error"]
    assert fragment in err["message"] and {"message", "type", "code"} <= set(err)
    if status == 400 and err["code"] != "invalid_json":  # every 400 about a field names it
        assert err["param"], err


def test_chat_refuses_images_and_strips_earlier_thoughts(server):
    http = httpx.Client(base_url=server.url)
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    assert http.post("/v1/chat/completions", json=image).status_code == 400
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": "More"}]
    thought = [dict(m) for m in plain]
    thought[1]["content"] = "<|channel>thought\nsome long private reasoning<channel|>Hello"
    usage = [http.post("/v1/chat/completions", json={"messages": m, "max_tokens": 2, "seed": 0}).json()["usage"]
             for m in (plain, thought)]
    assert usage[0]["prompt_tokens"] == usage[1]["prompt_tokens"]


def test_thought_channel_is_split_into_reasoning_content(text_model_dir):
    tok = Tokenizer.from_directory(text_model_dir)
    ids = tok.encode("<|channel>thought\nweigh it<channel|>The answer.", add_special_tokens=False)
    text = ChoiceText(tok, stops=[], split_thinking=True)
    reasoning, content = text.add(ids[:4], final=False)
    more_reasoning, more_content = text.add(ids[4:], final=True)
    assert reasoning + more_reasoning == "weigh it" and content + more_content == "The answer."
    assert held_back("abc", ["cde"]) == 1 and held_back("ab\ufffd", []) == 1 and held_back("abc", ["x"]) == 0


def test_api_key_is_enforced(text_model_dir):
    running = RunningServer(text_model_dir, api_key="sesame", max_tokens=8)
    try:
        with pytest.raises(openai.AuthenticationError):
            running.client(api_key="wrong").models.list()
        assert running.client(api_key="sesame").models.list().data[0].id == "dgemma"
        assert httpx.get(running.url + "/health").status_code == 200
    finally:
        running.stop()


def test_full_queue_answers_429_and_slow_requests_time_out(text_model_dir):
    running = RunningServer(text_model_dir, max_sequences=1, max_queue=1, max_tokens=64, timeout=0.3)
    try:
        async def burst():
            async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
                requests = [http.post("/v1/completions", json={"prompt": "x", "max_tokens": 64,
                                                               "max_denoising_steps": 40}) for _ in range(6)]
                return await asyncio.gather(*requests)

        statuses = sorted(r.status_code for r in asyncio.run(burst()))
        assert 429 in statuses and 504 in statuses and set(statuses) <= {429, 504, 200}
        assert httpx.get(running.url + "/health").json()["running"] == 0
    finally:
        running.stop()


def test_sigterm_drains_running_requests_then_exits(text_model_dir):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    process = subprocess.Popen([sys.executable, "-m", "dgemma", "serve", "--model", str(text_model_dir), "--port",
                                str(port), "--threads", "1"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        body = {"prompt": "Once", "max_tokens": 48, "max_denoising_steps": 30, "stability_threshold": None,
                "stream": True}
        lines = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if not lines:
                    process.send_signal(signal.SIGTERM)  # mid-generation
                lines.append(line)
        assert lines[-2] == "data: [DONE]" or lines[-1] == "data: [DONE]"
        finishes = [json.loads(l[5:])["choices"][0]["finish_reason"] for l in lines
                    if l.startswith("data: {") and json.loads(l[5:])["choices"]]
        assert finishes[-1] in ("stop", "length")  # the request ran to its end, not "cancelled"
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_serve_runs_the_engine_on_the_calling_thread_and_stops_on_sigint(text_model_dir):
    """`serve` (what `dgemma serve` calls, on the main thread) keeps the engine's loop on that thread and uvicorn on
    another: while it serves there is no engine thread; SIGINT drains and returns."""
    settings = ServerSettings(port=free_port(), max_tokens=16)
    url = f"http://127.0.0.1:{settings.port}"
    seen: dict = {}
    before = set(threading.enumerate())  # other tests' servers may have left engine threads running

    def client() -> None:
        try:
            deadline = time.time() + 60
            while time.time() < deadline:
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.05)
            seen["response"] = httpx.post(url + "/v1/completions", json={"prompt": "Once", "max_tokens": 8},
                                          timeout=60)
            seen["threads"] = [t.name for t in set(threading.enumerate()) - before]
        finally:
            os.kill(os.getpid(), signal.SIGINT)

    helper = threading.Thread(target=client)
    helper.start()
    serve(dgemma.load(text_model_dir), Tokenizer.from_directory(text_model_dir), settings)
    helper.join(10)
    assert seen["response"].status_code == 200 and seen["response"].json()["usage"]["completion_tokens"] > 0
    assert "dgemma-http" in seen["threads"] and "dgemma-engine" not in seen["threads"]


def test_serve_exits_with_an_error_when_uvicorn_cannot_listen(text_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = ServerSettings(port=taken.getsockname()[1])
        with pytest.raises(SystemExit) as exit_:
            serve(dgemma.load(text_model_dir), Tokenizer.from_directory(text_model_dir), settings)
    assert exit_.value.code not in (0, None)  # uvicorn's startup failure status


def test_response_format_json_schema_gives_valid_json(server):
    import jsonschema
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green"]}, "n": {"type": "integer"}},
              "required": ["colour", "n"], "additionalProperties": False}
    client = server.client()
    finished = 0
    for seed in range(4):
        out = client.chat.completions.create(
            model="dgemma", seed=seed, max_tokens=48, messages=[{"role": "user", "content": "A colour?"}],
            response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema, "strict": True}})
        if out.choices[0].finish_reason == "stop":
            finished += 1
            jsonschema.validate(json.loads(out.choices[0].message.content), schema)
    assert finished >= 1
    streamed = client.chat.completions.create(
        model="dgemma", seed=0, max_tokens=48, stream=True, messages=[{"role": "user", "content": "A colour?"}],
        response_format={"type": "json_object"})
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == "" or text.startswith("{")
    bad = httpx.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}})
    assert bad.status_code == 400 and "response_format" in bad.json()["error"]["message"]


def test_infill_extension_fills_holes_between_fixed_text(server):
    out = httpx.post(server.url + "/v1/completions", json={
        "prompt": "It is a truth {{3}} acknowledged, that a single {{2}} in", "infill": True, "seed": 1}).json()
    text = out["choices"][0]["text"]
    assert " acknowledged, that a single " in text and text.endswith(" in")
    assert httpx.post(server.url + "/v1/completions", json={"prompt": "no holes", "infill": True}).status_code == 400


def test_the_serving_bench_measures_autoregressive_requests_and_counts_their_steps(text_model_dir, tmp_path, capsys):
    """`dgemma bench --serving --decode autoregressive` against a real `dgemma serve`: every request answered in both
    modes, the server's steps (a token of every running sequence) counted; `--decode` alone is refused by name."""
    from dgemma.cli import main

    out = tmp_path / "serving.json"
    assert main(["bench", "--serving", "--model", str(text_model_dir), "--decode", "autoregressive", "--clients", "2",
                 "--max-new-tokens", "8", "--repeat", "1", "--threads", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["decode"] == "autoregressive"
    for mode in ("sequential", "concurrent"):
        summary = report["summary"][mode]
        assert 2 <= summary["tokens"]["median"] <= 16  # each request ends at its budget or an EOS
        assert summary["engine_steps"]["median"] >= summary["tokens"]["median"] / 2  # at most one token a step each
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "(autoregressive)" in capsys.readouterr().out
    assert main(["bench", "--decode", "autoregressive"]) == 2
    assert "--decode autoregressive is for --serving" in capsys.readouterr().err
