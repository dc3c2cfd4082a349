"""Load on `zaizai serve`: N concurrent streaming chat clients for a fixed time.

    python bench/serve_load.py OUT_DIR [--clients 32] [--duration 60] [--max-tokens 32]
    python bench/serve_load.py --url http://127.0.0.1:8000 [--api-key KEY] ...

With OUT_DIR it starts `zaizai serve OUT_DIR` on a free local port in a child process (so the clients here do
not share its interpreter) and stops it at the end; with --url it loads a server already running. Each client
sends streaming chat requests one after another until the time is up (a request started in time runs to its
end). Prints requests completed, errors, time to first token (p50/p95: from sending the request to the first
content delta), tokens per second (completion tokens over the wall time, from `include_usage`), server errors
(5xx) apart from other errors, and, for a server it started, its memory (RSS) at the start, the peak and the end.
The key (--api-key) is handed to the server it starts in ZAIZAI_API_KEY, not on its command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import httpx

PROMPTS = ["你好", "你会什么", "你是谁", "早上好", "晚安", "再见"]


async def client(number: int, url: str, headers: dict, deadline: float, max_tokens: int, stats: dict,
                 http: httpx.AsyncClient) -> None:
    i = 0
    while time.perf_counter() < deadline:
        body = {"model": "zaizai", "messages": [{"role": "user", "content": PROMPTS[(number + i) % len(PROMPTS)]}],
                "max_tokens": max_tokens, "temperature": 0.8, "stream": True,
                "stream_options": {"include_usage": True}}
        i += 1
        start = time.perf_counter()
        first = None
        try:
            async with http.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
                if r.status_code != 200:
                    await r.aread()
                    stats["errors"].append(f"HTTP {r.status_code}: {r.text[:200]}")
                    continue
                done = False
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise RuntimeError(chunk["error"]["message"])
                    if chunk.get("usage"):
                        stats["tokens"] += chunk["usage"]["completion_tokens"]
                    if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        first = time.perf_counter() - start
                if not done:
                    raise RuntimeError("the stream ended without [DONE]")
        except Exception as e:  # noqa: BLE001 (counted and shown)
            stats["errors"].append(f"{type(e).__name__}: {e}")
            continue
        stats["completed"] += 1
        if first is not None:
            stats["ttft"].append(first)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def rss_mb(pid: int | None) -> float | None:
    """The resident memory of process ``pid`` in MB (Linux), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration, TypeError):
        return None


async def sample_rss(pid: int | None, samples: list[float]) -> None:
    while True:
        rss = rss_mb(pid)
        if rss is not None:
            samples.append(rss)
        await asyncio.sleep(1.0)


async def run(url: str, api_key: str | None, clients: int, duration: float, max_tokens: int,
              pid: int | None = None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    stats = {"completed": 0, "errors": [], "ttft": [], "tokens": 0, "rss": []}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    sampler = asyncio.ensure_future(sample_rss(pid, stats["rss"]))
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as http:
        start = time.perf_counter()
        deadline = start + duration
        await asyncio.gather(*(client(n, url, headers, deadline, max_tokens, stats, http) for n in range(clients)))
        stats["wall_s"] = time.perf_counter() - start
    sampler.cancel()
    if rss_mb(pid) is not None:
        stats["rss"].append(rss_mb(pid))
    return stats


def start_server(out_dir: str, api_key: str | None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "zaizai", "serve", out_dir, "--port", str(port)]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    env.pop("ZAIZAI_API_KEY", None)
    if api_key:
        env["ZAIZAI_API_KEY"] = api_key  # (not on the command line, where `ps` shows it)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"zaizai serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.terminate()
    raise SystemExit("zaizai serve did not start within 60 s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", nargs="?", help="model folder to serve (or give --url)")
    p.add_argument("--url", default=None, help="a running server, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=60.0, help="seconds (default 60)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request (default 32)")
    args = p.parse_args()
    if not (args.out_dir or args.url):
        p.error("give a model folder or --url")
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args.out_dir, args.api_key)
    try:
        health = httpx.get(f"{url}/health", timeout=10).json()
        stats = asyncio.run(run(url, args.api_key, args.clients, args.duration, args.max_tokens,
                                proc.pid if proc is not None else None))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"server            {url}  model {health.get('model')} (context {health.get('block_size')})")
    print(f"clients           {args.clients} streaming, {args.duration:g} s, max_tokens {args.max_tokens}")
    print(f"requests done     {stats['completed']}  ({stats['completed'] / stats['wall_s']:.1f}/s)")
    server_errors = sum(e.startswith("HTTP 5") for e in stats["errors"])
    print(f"errors            {len(stats['errors'])}  (5xx: {server_errors})")
    for line in sorted(set(stats["errors"]))[:5]:
        print(f"  e.g. {line}")
    print(f"time to 1st token p50 {percentile(stats['ttft'], 50) * 1000:.0f} ms · "
          f"p95 {percentile(stats['ttft'], 95) * 1000:.0f} ms")
    print(f"tokens/s          {stats['tokens'] / stats['wall_s']:.0f}  ({stats['tokens']} completion tokens "
          f"in {stats['wall_s']:.1f} s)")
    if stats["rss"]:
        rss = stats["rss"]
        print(f"server memory     {rss[0]:.0f} MB at the start · peak {max(rss):.0f} MB · {rss[-1]:.0f} MB at the end")
    return 1 if stats["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
