"""Load on `zaizai serve`: 1, 8, 16 and 32 concurrent streaming chat clients, what continuous batching gains.

    python bench/serve_load.py                                   # trains a 6L/384d chat model first (~30 s)
    python bench/serve_load.py --duration 15 --train-seconds 20  # a short run
    python bench/serve_load.py --model OUT_DIR [--clients 1,8,32] [--max-tokens 64]
    python bench/serve_load.py --url http://127.0.0.1:8000 [--api-key KEY] ...

Without --model or --url it first trains a chat model on the built-in demo dialogues (chatterbot-corpus Chinese
+ 崽崽's introduction; ``--layers/--heads/--embd/--block-size``, 6/6/384/256 by default, for
``--train-seconds``): how good it is does not matter here, its shape does. It starts `zaizai serve` on it in a
child process on a free local port (``--max-active`` = the most clients, so that they all fit in one batch), and
stops it at the end; with --url it loads a server already running.

For each number of clients (``--clients``), after one warm-up request, each client sends streaming chat requests
one after another for ``--duration`` seconds (a request started in time runs to its end), each asking for
``--max-tokens`` tokens with ``ignore_eos`` (every request the same work). Printed per level: requests done,
errors (5xx apart), aggregate tokens/s (completion tokens, from ``include_usage``, over the wall time) and its
ratio to 1 client, time to first token p50/p95 (from sending the request to the first content delta), and the
server's mean batch (tokens per decode step, from ``/health``). Also: the CPU (lscpu's model name, whether it has
native bf16) and, for a server it started, its memory (RSS) at the start, the peak and the end.
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
import tempfile
import time
from pathlib import Path

import httpx

PROMPTS = ["你好", "你会什么", "你是谁", "早上好", "晚安", "再见"]


def cpu() -> tuple[str, bool]:
    """The CPU's model name (lscpu) and whether it has native bf16 (avx512_bf16 or amx_bf16)."""
    name, flags = "unknown CPU", ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        name, flags = fields.get("Model name", name).strip(), fields.get("Flags", "")
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    if not flags:
        try:
            flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        except (OSError, StopIteration):
            pass
    return name, any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


async def request(number: int, i: int, url: str, headers: dict, max_tokens: int, stats: dict,
                  http: httpx.AsyncClient) -> None:
    """One streaming chat request, counted in ``stats``."""
    body = {"model": "zaizai", "messages": [{"role": "user", "content": PROMPTS[(number + i) % len(PROMPTS)]}],
            "max_tokens": max_tokens, "temperature": 0.8, "seed": number * 1000 + i, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    try:
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                stats["errors"].append(f"HTTP {r.status_code}: {r.text[:200]}")
                return
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
        return
    stats["completed"] += 1
    if first is not None:
        stats["ttft"].append(first)


async def client(number: int, url: str, headers: dict, deadline: float, max_tokens: int, stats: dict,
                 http: httpx.AsyncClient) -> None:
    """Requests one after another until ``deadline``."""
    i = 0
    while time.perf_counter() < deadline:
        await request(number, i, url, headers, max_tokens, stats, http)
        i += 1


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


async def run(url: str, headers: dict, clients: int, duration: float, max_tokens: int, rss: list[float],
              pid: int | None = None) -> dict:
    stats = {"completed": 0, "errors": [], "ttft": [], "tokens": 0}
    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
    sampler = asyncio.ensure_future(sample_rss(pid, rss))
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as http:
        warm = {"completed": 0, "errors": [], "ttft": [], "tokens": 0}
        await request(0, 0, url, headers, max_tokens, warm, http)
        before = (await http.get(f"{url}/health")).json()
        start = time.perf_counter()
        deadline = start + duration
        await asyncio.gather(*(client(n, url, headers, deadline, max_tokens, stats, http) for n in range(clients)))
        stats["wall_s"] = time.perf_counter() - start
        after = (await http.get(f"{url}/health")).json()
    sampler.cancel()
    steps = after.get("steps", 0) - before.get("steps", 0)
    stats["mean_batch"] = stats["tokens"] / steps if steps else float("nan")
    return stats


def train_model(folder: Path, args) -> Path:
    """A chat model of the asked shape, trained on the demo dialogues for ``args.train_seconds``."""
    import zaizai
    from zaizai.demo import build_demo_corpus

    corpus = build_demo_corpus(folder / "corpus.jsonl")
    zaizai.prepare([corpus], folder / "data", val_fraction=0.05, seed=1, verbose=False)
    zaizai.train(folder / "data", folder / "model", preset="small", n_layer=args.layers, n_head=args.heads,
                 n_embd=args.embd, block_size=args.block_size, dropout=0.0, batch_size=8, eval_iters=2,
                 max_time=args.train_seconds, verbose=False)
    return folder / "model"


def start_server(out_dir: str, api_key: str | None, max_active: int,
                 compile: bool = False) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "zaizai", "serve", out_dir, "--port", str(port), "--max-active", str(max_active)]
    cmd += ["--compile"] if compile else []
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    env.pop("ZAIZAI_API_KEY", None)
    if api_key:
        env["ZAIZAI_API_KEY"] = api_key  # (not on the command line, where `ps` shows it)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1800 if compile else 600):  # (--compile compiles before the server listens)
        if proc.poll() is not None:
            raise SystemExit(f"zaizai serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.terminate()
    raise SystemExit(f"zaizai serve did not start within {180 if compile else 60} s")


def report(levels: dict[int, dict], args) -> None:
    one = levels.get(1)
    print(f"{'clients':>7} {'requests':>8} {'errors':>6} {'5xx':>4} {'tok/s':>7} {'vs 1':>6} "
          f"{'TTFT p50':>9} {'TTFT p95':>9} {'batch':>6}")
    for n, s in levels.items():
        rate = s["tokens"] / s["wall_s"]
        ratio = f"{rate / (one['tokens'] / one['wall_s']):.2f}x" if one and one["tokens"] else "-"
        server_errors = sum(e.startswith("HTTP 5") for e in s["errors"])
        print(f"{n:>7} {s['completed']:>8} {len(s['errors']):>6} {server_errors:>4} {rate:>7.0f} {ratio:>6} "
              f"{percentile(s['ttft'], 50) * 1000:>7.0f}ms {percentile(s['ttft'], 95) * 1000:>7.0f}ms "
              f"{s['mean_batch']:>6.1f}")
    errors = sorted({e for s in levels.values() for e in s["errors"]})
    for line in errors[:5]:
        print(f"  e.g. {line}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", nargs="?", help="(same as --model)")
    p.add_argument("--model", default=None, metavar="OUT_DIR", help="a trained model folder to serve")
    p.add_argument("--url", default=None, help="a running server, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--clients", default="1,8,16,32", help="concurrent clients, comma-separated (default 1,8,16,32)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per level (default 20)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request (default 64)")
    p.add_argument("--compile", action="store_true",
                   help="serve with --compile (a lone generation steps through the compiled decode step)")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--embd", type=int, default=384)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--train-seconds", type=float, default=30.0, help="training time of the model it makes")
    args = p.parse_args()
    args.model = args.model or args.out_dir
    args.levels = [int(c) for c in args.clients.split(",") if c.strip()]
    if not args.levels or min(args.levels) < 1:
        p.error("--clients: give positive numbers, e.g. 1,8,16,32")
    return args


def main() -> int:
    args = parse_args()
    name, bf16 = cpu()
    print(f"cpu               {name} · {os.cpu_count()} logical CPUs · native bf16: {'yes' if bf16 else 'no'}")
    proc, url, tmp = None, args.url, None
    if url is None:
        model = args.model
        if model is None:
            tmp = tempfile.TemporaryDirectory(prefix="zaizai-serve-load-")
            started = time.perf_counter()
            model = str(train_model(Path(tmp.name), args))
            print(f"model             {args.layers}L/{args.embd}d, block {args.block_size}, demo dialogues, "
                  f"trained {time.perf_counter() - started:.0f} s")
        proc, url = start_server(model, args.api_key, max(args.levels), args.compile)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rss: list[float] = []
    levels: dict[int, dict] = {}
    try:
        health = httpx.get(f"{url}/health", timeout=10).json()
        print(f"server            {url}  model {health.get('model')} (context {health.get('block_size')}, "
              f"max_active {health.get('max_active')})")
        print(f"load              streaming chat, {args.duration:g} s per level, max_tokens {args.max_tokens} "
              "(ignore_eos), temperature 0.8")
        for n in args.levels:
            levels[n] = asyncio.run(run(url, headers, n, args.duration, args.max_tokens, rss,
                                        proc.pid if proc is not None else None))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        if tmp is not None:
            tmp.cleanup()
    report(levels, args)
    if rss:
        print(f"server memory     {rss[0]:.0f} MB at the start · peak {max(rss):.0f} MB · {rss[-1]:.0f} MB at the end")
    return 1 if any(s["errors"] for s in levels.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
