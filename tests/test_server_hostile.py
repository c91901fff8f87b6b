"""`dgemma serve` under hostile and careless clients (issue 12): a client that has gone holds no row, queue place,
byte or second; sizes are checked before work; bad input is a 400; the conventions clients rely on hold.

Raw sockets where the HTTP client libraries would hide what is tested (disconnects, chunked bodies, slow
headers); a generation that would run for many seconds (1,024 steps per canvas) stands for a busy server."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time

import httpx
import pytest

import dgemma
from dgemma.serving import guard
from dgemma.serving.scheduler import Finish, Scheduler, SequenceRequest
from dgemma.tokenizer import Tokenizer
from test_serving import RunningServer

# About 8,000 decoder steps: many seconds on any machine, so a row freed "at once" is told apart from one freed at
# the end of the generation.
LONG = {"prompt": "Once", "max_tokens": 64, "max_denoising_steps": 1024, "stability_threshold": None}


@pytest.fixture(scope="module")
def tight(text_model_dir):
    """One row, a queue of two, small prompts, short read and keep-alive deadlines."""
    running = RunningServer(text_model_dir, max_sequences=1, max_queue=2, max_prompt_tokens=256, max_tokens=64,
                            max_prompt_bytes=4096, read_timeout=1.0, keep_alive_timeout=1.0)
    yield running
    running.stop()


def health(server) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json()


def wait_until(condition, seconds: float) -> float:
    """Seconds until `condition()` held; fails after `seconds`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < seconds, f"not within {seconds} s"
        time.sleep(0.02)
    return time.monotonic() - start


def idle(server) -> bool:
    load = health(server)
    return load["running"] == 0 and load["waiting"] == 0


def raw_post(server, body: dict | bytes, path: str = "/v1/completions", headers: str = "") -> socket.socket:
    """Send a whole POST on a fresh connection and return the socket without reading the answer."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n{headers}\r\n".encode() + data)
    return sock


def read_all(sock: socket.socket, seconds: float) -> bytes:
    """Everything the server sends until it closes the connection (fails if it does not within `seconds`)."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except socket.timeout:
        pytest.fail(f"the server kept the connection open for {seconds} s; got {data[:200]!r}")
    except ConnectionResetError:
        pass
    return data


def post(server, body, path: str = "/v1/completions", **kwargs) -> httpx.Response:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(server.url + path, content=data, headers={"content-type": "application/json"}, timeout=30,
                      **kwargs)


# ---- a client that is gone frees everything at once ----------------------------------------------------------------

def test_a_non_streaming_client_that_leaves_frees_its_row_at_once(tight):
    sock = raw_post(tight, LONG)
    wait_until(lambda: health(tight)["running"] == 1, 10)
    sock.close()
    assert wait_until(lambda: idle(tight), 3) < 3  # before: the row was held until the generation ended


def test_queued_clients_that_leave_leave_the_queue_at_once(tight):
    holder = raw_post(tight, LONG)
    wait_until(lambda: health(tight)["running"] == 1, 10)
    queued = [raw_post(tight, {**LONG, "stream": True}), raw_post(tight, LONG)]
    wait_until(lambda: health(tight)["waiting"] == 2, 10)
    for sock in queued:
        sock.close()
    wait_until(lambda: health(tight)["waiting"] == 0, 2)  # before: until the running request ended
    fresh = raw_post(tight, LONG)  # admitted to the queue, not told 429
    wait_until(lambda: health(tight)["waiting"] == 1, 5)
    fresh.close()
    holder.close()
    wait_until(lambda: idle(tight), 3)


def test_a_request_is_queued_whole_or_not_at_all(tight):
    never = post(tight, {"prompt": ["a", "b"], "n": 2, "max_tokens": 4})  # 4 sequences; 1 row, 2 waiting
    assert never.status_code == 400 and "at most 3" in never.json()["error"]["message"]
    holder = raw_post(tight, LONG)
    wait_until(lambda: health(tight)["running"] == 1, 10)
    queued = raw_post(tight, LONG)
    wait_until(lambda: health(tight)["waiting"] == 1, 10)
    later = post(tight, {"prompt": ["a", "b"], "max_tokens": 4})  # 2 sequences, 1 place left of 3
    assert later.status_code == 429 and later.headers["retry-after"].isdigit()
    assert later.json()["error"]["type"] == "rate_limit_error"
    assert health(tight)["waiting"] == 1  # nothing of it was left behind
    queued.close()
    holder.close()
    wait_until(lambda: idle(tight), 3)


# ---- bytes and seconds are bounded before work is done ----------------------------------------------------------

def test_a_chunked_body_over_the_limit_is_refused_while_it_arrives(tight):
    sock = socket.create_connection(("127.0.0.1", tight.port), timeout=10)
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{tight.port}\r\nContent-Type: application/json"
                 "\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    chunk = b"a" * 65536

    def flood():  # 4 MiB, four times the limit, and the body never ends
        try:
            sock.sendall(b'10\r\n{"prompt": "aaaa\r\n')
            for _ in range(64):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:
            pass  # the server closed the connection: what we want

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    answer = read_all(sock, 5)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"connection: close" in answer.lower()
    assert idle(tight)
    sock = socket.create_connection(("127.0.0.1", tight.port), timeout=10)
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {2 << 20}\r\n\r\n".encode())
    assert read_all(sock, 5).startswith(b"HTTP/1.1 413")
    sock.close()


def test_slow_and_idle_connections_are_closed_after_the_read_timeout(tight):
    port = tight.port
    silent = socket.create_connection(("127.0.0.1", port))
    partial_headers = socket.create_connection(("127.0.0.1", port))
    partial_headers.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Slow: ".encode())
    partial_body = socket.create_connection(("127.0.0.1", port))
    partial_body.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: "
                         "application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\": ".encode())
    kept_alive = socket.create_connection(("127.0.0.1", port))
    kept_alive.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    start = time.monotonic()
    answers = [read_all(s, 4) for s in (silent, partial_headers, partial_body, kept_alive)]  # before: never closed
    assert time.monotonic() - start < 4
    assert answers[1].startswith(b"HTTP/1.1 408") and answers[2].startswith(b"HTTP/1.1 408")
    assert answers[3].startswith(b"HTTP/1.1 200")  # answered, then closed when idle
    for sock in (silent, partial_headers, partial_body, kept_alive):
        sock.close()


def test_tokenising_runs_off_the_event_loop(tight):
    tokenizer = tight.app.state.service.tokenizer
    encode = tokenizer.encode

    def slow_encode(*args, **kwargs):
        time.sleep(1.5)
        return encode(*args, **kwargs)

    tokenizer.encode = slow_encode
    try:
        request = threading.Thread(target=post, args=(tight, {"prompt": "Once", "max_tokens": 8}))
        request.start()
        time.sleep(0.3)  # the request is being tokenised now
        start = time.monotonic()
        assert health(tight)["status"] == "ok"
        assert time.monotonic() - start < 0.7  # before: /health waited for the tokeniser
        request.join(30)
    finally:
        del tokenizer.encode
    wait_until(lambda: idle(tight), 5)


@pytest.mark.parametrize("body, fragment", [
    ({"prompt": "word " * 1000}, "5000 bytes"),  # measured before tokenising
    ({"messages": [{"role": "user", "content": "word " * 500}] * 2}, "5000 bytes"),
    ({"prompt": "Once{{99999999}}end", "infill": True}, "holes need 99999999 tokens"),  # before: 21 s
    ({"prompt": "Once{{1200}}end", "infill": True}, "holes need 1200 tokens"),
    ({"prompt": "Once{{" + "9" * 4000 + "}}", "infill": True}, "larger than max_tokens allows (64)"),
    ({"prompt": "Once{{20}} upon a time{{2}}end", "infill": True, "max_tokens": 16}, "max_tokens allows 16"),
    ({"prompt": ["a"] * 150_000}, "150000 sequences"),  # before: 4 s of tokenising, then 429
    ({"prompt": list(range(300))}, "300 tokens"),
    ({"messages": [{"role": "user", "content": ""}] * 300}, "300 messages"),  # more than 256 tokens' worth
])
def test_sizes_are_checked_before_any_work(tight, body, fragment):
    start = time.monotonic()
    response = post(tight, body, "/v1/chat/completions" if "messages" in body else "/v1/completions")
    assert response.status_code == 400 and fragment in response.json()["error"]["message"]
    assert time.monotonic() - start < 2


def test_infilling_keeps_to_max_tokens(tight):
    out = post(tight, {"prompt": "Once{{3}} upon a{{2}} time", "infill": True, "max_tokens": 32, "seed": 0}).json()
    assert out["choices"][0]["text"].endswith(" time") and out["usage"]["completion_tokens"] <= 32


# ---- bad input is a 400, never a 500 --------------------------------------------------------------------------

def nested_schema(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.mark.parametrize("path, body, fragment", [
    ("/v1/completions", '{"prompt": "\\ud800"}', "surrogate"),
    ("/v1/completions", '{"prompt": ["ok", "a\\udfffb"]}', "prompt.1"),
    ("/v1/completions", '{"prompt": "x", "stop": ["\\ud800"]}', "surrogate"),
    ("/v1/completions", b'{"prompt": "\xed\xa0\x80"}', ""),  # a surrogate in raw bytes: not UTF-8 at all
    ("/v1/completions", '{"prompt": "x", "\\ud800": 1}', ""),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
    ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"add_generation_prompt": False}},
     "add_generation_prompt"),
    ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"messages": []}}, "messages"),
    ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"bos_token": "x"}}, "bos_token"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "deep", "schema": nested_schema(400)}}}, "nested more than 64 levels"),
    ("/v1/completions", {"prompt": "x", "seed": 2 ** 64}, "`seed` must be an integer from -2**63 to 2**64 - 1"),
    ("/v1/completions", {"prompt": "x", "seed": -2 ** 63 - 1}, "`seed`"),
    ("/v1/completions", {"prompt": "x", "stop": "y" * 1001}, "at most 1000 characters"),
    ("/v1/completions", {"prompt": "x", "confidence_threshold": 1e300}, "confidence_threshold"),  # fp32 overflow
    ("/v1/completions", {"prompt": "x", "stability_threshold": 2 ** 40}, "stability_threshold"),  # int32
    ("/v1/completions", {"prompt": "x", "t_min": 0, "t_max": 1e-300}, "`t_max` must be 0 or at least"),
    ("/v1/completions", '{"prompt": "x", "entropy_bound": NaN}', "entropy_bound"),
])
def test_malformed_input_is_a_400_that_says_why(tight, text_model_dir, path, body, fragment):
    response = post(tight, body, path)
    assert response.status_code == 400, response.text
    err = response.json()["error"]
    assert fragment in err["message"] and err["type"] == "invalid_request_error"
    assert "Traceback" not in response.text and str(text_model_dir) not in response.text


def test_a_seed_at_the_top_of_the_range_serves_every_choice(tight):
    out = post(tight, {"prompt": "x", "seed": 2 ** 64 - 1, "n": 2, "max_tokens": 2})
    assert out.status_code == 200 and len(out.json()["choices"]) == 2


def test_a_sequence_that_cannot_start_ends_with_an_error_not_a_hang(text_model_dir):
    model, tokenizer = dgemma.load(text_model_dir), Tokenizer.from_directory(text_model_dir)
    scheduler = Scheduler(model, tokenizer, max_sequences=2, max_queue=4, max_context=64)
    scheduler.start()
    events: dict[str, list] = {"seed": [], "settings": [], "good": []}
    config = model.generation_config.updated(max_new_tokens=8)
    unrepresentable = config.updated(confidence_threshold=1e300)  # valid, but no fp32 row setting holds it
    try:
        for name, seed, settings in (("seed", 2 ** 70, config), ("settings", 1, unrepresentable),
                                     ("settings", 2, unrepresentable), ("good", 1, config)):
            scheduler.submit([SequenceRequest(prompt=[2, 5, 6], config=settings, seed=seed,
                                              on_event=events[name].append)])
        wait_until(lambda: any(isinstance(e, Finish) for e in events["good"]), 10)
        finishes = [e for name in ("seed", "settings") for e in events[name] if isinstance(e, Finish)]
        assert [e.reason for e in finishes] == ["error"] * 3 and events["good"][-1].reason in ("stop", "length")
        assert not scheduler.running and scheduler.engine.free_rows == 2  # before: the failed ones kept rows
    finally:
        scheduler.stop(drain=False, timeout=10)


def test_a_chat_without_template_is_a_400_without_paths(text_model_dir, tmp_path):
    bare = tmp_path / "model"
    shutil.copytree(text_model_dir, bare)
    (bare / "chat_template.jinja").unlink()
    running = RunningServer(bare, max_tokens=4)
    try:
        response = post(running, CHAT, "/v1/chat/completions")
        assert response.status_code == 400 and "no chat template" in response.json()["error"]["message"]
        assert str(tmp_path) not in response.text
    finally:
        running.stop()


def test_a_bug_answers_an_openai_shaped_500_and_the_server_goes_on(tight, monkeypatch):
    def broken(request):
        raise RuntimeError("/secret/path/in/a/bug")

    monkeypatch.setattr(tight.app.state.service, "_plan", broken)
    response = post(tight, {"prompt": "x", "max_tokens": 2})
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    assert "/secret" not in response.text
    monkeypatch.undo()
    assert post(tight, {"prompt": "x", "max_tokens": 2}).status_code == 200


# ---- conventions clients rely on ------------------------------------------------------------------------------------

def test_temperature_zero_takes_the_argmax_and_is_reproducible_without_a_seed(tight):
    answers = [post(tight, {"prompt": "Once", "max_tokens": 8, "temperature": 0}) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].json()["choices"][0]["text"] == answers[1].json()["choices"][0]["text"]


def test_405_says_allow_and_the_openapi_document_says_400(tight):
    response = httpx.get(tight.url + "/v1/completions")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    document = httpx.get(tight.url + "/openapi.json").json()
    for route in ("/v1/completions", "/v1/chat/completions"):
        responses = document["paths"][route]["post"]["responses"]
        assert "422" not in responses and {"400", "413", "429"} <= set(responses)


@pytest.fixture(scope="module")
def keyed(text_model_dir):
    running = RunningServer(text_model_dir, api_key="sesame", allowed_hosts="api.example.com, 127.0.0.1",
                            max_tokens=4)
    yield running
    running.stop()


def test_the_api_key_is_compared_in_constant_time(keyed, monkeypatch):
    compared = []

    def spy(a, b):
        compared.append((a, b))
        return guard_compare(a, b)

    guard_compare = guard.compare_digest
    monkeypatch.setattr(guard, "compare_digest", spy)
    assert httpx.get(keyed.url + "/v1/models", headers={"authorization": "Bearer sesame"}).status_code == 200
    assert compared == [(b"Bearer sesame", b"Bearer sesame")]
    for wrong in (b"Bearer sesam", b"Bearer sesame2", b"Bearer s\xe9same", b""):
        sock = socket.create_connection(("127.0.0.1", keyed.port), timeout=10)
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nAuthorization: " + wrong
                     + b"\r\n\r\n")
        assert read_all(sock, 5).startswith(b"HTTP/1.1 401")
        sock.close()
    # Refused before its body is read, a request's connection is closed: no endless body is read or held.
    sock = socket.create_connection(("127.0.0.1", keyed.port), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"10\r\n{\"prompt\": \"aaaa\r\n")
    assert read_all(sock, 5).startswith(b"HTTP/1.1 401")
    sock.close()


def test_host_headers_outside_the_allow_list_are_refused(tight, keyed):
    assert httpx.get(tight.url + "/health", headers={"host": "attacker.example"}).status_code == 400
    assert httpx.get(tight.url + "/", headers={"host": "attacker.example:80"}).status_code == 400
    for name in (f"localhost:{tight.port}", "127.0.0.1", "[::1]:8000"):  # loopback names, the default
        assert httpx.get(tight.url + "/health", headers={"host": name}).status_code == 200
    assert httpx.get(keyed.url + "/health", headers={"host": "API.example.com:443"}).status_code == 200
    assert httpx.get(keyed.url + "/health", headers={"host": "localhost"}).status_code == 400  # not listed


def test_host_allow_list_defaults():
    from dgemma.serving.settings import ServerSettings

    public = guard.HostAllowList(ServerSettings(host="0.0.0.0"))
    assert public("anything.example")
    loopback = guard.HostAllowList(ServerSettings())
    assert loopback("127.0.0.1:8000") and loopback("localhost") and not loopback("evil.example")
    assert guard.HostAllowList(ServerSettings(host="0.0.0.0", allowed_hosts="*"))("x")
    assert not guard.HostAllowList(ServerSettings(host="0.0.0.0", allowed_hosts="a.example"))("b.example")
