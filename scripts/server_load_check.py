"""A bounded load check of `dgemma serve` with careless clients; prints its figures as JSON.

Starts `dgemma serve` (the bundled model unless --model) in a subprocess with a queue that exactly holds the
load, then sends CLIENTS concurrent requests: most stream to the end, LEAVERS go away (half streaming chat that
leaves after its first chunk, half non-streaming that leaves mid-wait, whether queued or running). While the
leavers' places should be free again, a probe client asks every 50 ms until one request is admitted (answered
200 and queued, rather than 429). Reports:
errors (anything but a complete answer, apart from the probe's 429s), 429s, the time from the last leaver's
disconnect until a new request is admitted, /health latency under load, and the server's RSS before, with the
queue full, and after each round (the same load runs --rounds times).

    python scripts/server_load_check.py [--model DIR] [--clients 64] [--leavers 16] [--max-sequences 8]

Needs httpx (a test extra).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


async def wait_healthy(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"the server exited with {process.returncode}: {process.stderr.read()[-2000:]}")
            try:
                if (await client.get(url + "/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit("the server did not start")


async def load(url: str, args, pid: int) -> dict:
    limits = httpx.Limits(max_connections=args.clients * 2 + 16, max_keepalive_connections=0)
    client = httpx.AsyncClient(base_url=url, timeout=300, limits=limits)
    results: dict[str, int] = {"completed": 0, "errors": 0, "status_429": 0, "left": 0}
    problems: list[str] = []
    leave = asyncio.Event()

    async def stayer(i: int) -> None:
        body = {"prompt": f"It is a truth universally acknowledged {i}", "max_tokens": args.max_tokens, "seed": i,
                "stream": True}
        try:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    results["status_429" if response.status_code == 429 else "errors"] += 1
                    problems.append(f"stayer {i}: {response.status_code}")
                    return
                finish, done = None, False
                async for line in response.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            problems.append(f"stayer {i}: {chunk['error']}")
                        elif chunk["choices"]:
                            finish = chunk["choices"][0]["finish_reason"] or finish
                ok = done and finish in ("stop", "length")
                results["completed" if ok else "errors"] += 1
                if not ok:
                    problems.append(f"stayer {i}: finish {finish}, done {done}")
        except Exception as err:  # noqa: BLE001 (a load check counts every failure)
            results["errors"] += 1
            problems.append(f"stayer {i}: {err!r}")

    async def streaming_leaver(i: int) -> None:
        body = {"messages": [{"role": "user", "content": f"Tell me a long story {i}"}], "stream": True,
                "max_tokens": args.max_tokens, "seed": 1000 + i}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                results["errors"] += 1
                problems.append(f"streaming leaver {i}: {response.status_code}")
                return
            lines = response.aiter_lines()
            await lines.__anext__()  # the role chunk: sent at once, queued or running
            await leave.wait()
        results["left"] += 1  # leaving the block closes the connection mid-stream

    async def waiting_leaver(i: int) -> None:
        body = {"prompt": f"Once upon a time {i}", "max_tokens": args.max_tokens, "seed": 2000 + i}
        task = asyncio.create_task(client.post("/v1/completions", json=body))
        await leave.wait()
        if task.done():
            results["errors"] += 1
            problems.append(f"non-streaming leaver {i} finished before leaving: {task.result().status_code}")
            return
        task.cancel()  # closes the connection: the client is gone
        results["left"] += 1

    half = args.leavers // 2
    tasks = [asyncio.create_task(stayer(i)) for i in range(args.clients - args.leavers)]
    tasks += [asyncio.create_task(streaming_leaver(i)) for i in range(half)]
    tasks += [asyncio.create_task(waiting_leaver(i)) for i in range(args.leavers - half)]

    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as monitor:
        async def health() -> dict:
            start = time.monotonic()
            body = (await monitor.get("/health")).json()
            latencies.append(time.monotonic() - start)
            return body

        deadline = time.monotonic() + 60
        while True:  # every request is in: the queue is full
            state = await health()
            arrived = state["running"] + state["waiting"] + results["completed"] + results["errors"]
            if arrived >= args.clients or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        full = state
        rss_full = rss_mib(pid)
        # While every place is held, a new request is refused: the admission below is the leavers' places.
        refused = await monitor.post("/v1/completions", json={"prompt": "Too many", "max_tokens": 8})
        leave.set()
        await asyncio.sleep(0)  # let every leaver close its connection
        left_at = time.monotonic()
        probe_429 = 0
        admitted = asyncio.get_running_loop().create_future()

        async def probe() -> None:  # streams, so that its 200 comes once it is queued: admitted
            body = {"prompt": "A probe", "max_tokens": 8, "seed": 7, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as response:
                admitted.set_result(response.status_code)
                if response.status_code == 200:
                    tail = [line async for line in response.aiter_lines() if line][-1:]
                    if tail != ["data: [DONE]"]:
                        results["errors"] += 1
                        problems.append(f"probe ended with {tail}")

        admitted_s = None
        while time.monotonic() - left_at < 60:
            admitted = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(probe())
            status = await admitted
            if status == 200:
                admitted_s = time.monotonic() - left_at
                tasks.append(task)
                break
            await task
            if status != 429:
                results["errors"] += 1
                problems.append(f"probe: {status}")
                break
            probe_429 += 1
            await asyncio.sleep(0.05)
        sampler = asyncio.create_task(sample_health(health))
        await asyncio.gather(*tasks)
        sampler.cancel()
        await client.aclose()
        deadline = time.monotonic() + 30
        while (state := await health())["running"] + state["waiting"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    return {**results, "probe_429": probe_429, "status_429": results["status_429"] + probe_429,
            "load_when_full": {k: full[k] for k in ("running", "waiting")},
            "new_request_while_full": {"status": refused.status_code,
                                       "retry_after": refused.headers.get("retry-after")},
            "new_request_admitted_s": None if admitted_s is None else round(admitted_s, 3),
            "idle_after": state["running"] == 0 and state["waiting"] == 0,
            "health_latency_ms": {"median": round(statistics.median(latencies) * 1000, 1),
                                  "max": round(max(latencies) * 1000, 1), "samples": len(latencies)},
            "rss_mib_full": rss_full, "problems": problems[:10]}


async def sample_health(health) -> None:
    while True:
        await health()
        await asyncio.sleep(0.1)


async def main_async(args) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "dgemma", "serve", "--port", str(port), "--max-sequences",
               str(args.max_sequences), "--max-queue", str(args.max_queue or args.clients - args.max_sequences),
               "--max-tokens",
               str(args.max_tokens), "--threads", str(args.threads)]
    if args.model:
        command += ["--model", args.model]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        await wait_healthy(url, process)
        async with httpx.AsyncClient(base_url=url, timeout=60) as warm:  # one request first: steady-state RSS
            await warm.post("/v1/completions", json={"prompt": "Warm up", "max_tokens": args.max_tokens})
        rss_before = rss_mib(process.pid)
        rounds = []
        for _ in range(args.rounds):
            start = time.monotonic()
            figures = await load(url, args, process.pid)
            figures["wall_s"] = round(time.monotonic() - start, 2)
            figures["rss_mib_after"] = rss_mib(process.pid)
            rounds.append(figures)
        return {"command": " ".join(command[1:]), "clients": args.clients,
                "leavers": {"streaming": args.leavers // 2, "non_streaming": args.leavers - args.leavers // 2},
                "rss_mib_before": rss_before, "rounds": rounds}
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--leavers", type=int, default=16)
    parser.add_argument("--max-sequences", type=int, default=8)
    parser.add_argument("--max-queue", type=int, help="default: clients - max-sequences (the load fills the server)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="the same load again, to see memory stay flat")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main_async(args)), indent=2))


if __name__ == "__main__":
    main()
