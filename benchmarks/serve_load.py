"""Load on `medtune serve` over loopback, batched and with batching switched off, in one run; prints JSON.

    python benchmarks/serve_load.py [--clients 16] [--requests 500] [--max_tokens 16] [--model DIR] [--threads 1]

Each mode starts `medtune serve` as users start it (a subprocess of the CLI, the default tiny GLM-4 model unless
`--model`), sends two warm-up requests, then `--clients` concurrent clients each send `--requests` chat requests one
after another (greedy, `--max_tokens` tokens each, questions taken in turn from a list). Per mode: requests/s,
generated tokens/s (the servers' `usage.completion_tokens` over the wall time), p50/p95 latency, errors (any reply
other than 200 with a full usage block), and the server's RSS after warm-up and at the end. The unbatched server is
the same command with `--no_batching` (one reply at a time; a queue as long as the client count, so nobody gets
429). The last field is batched generated tokens/s divided by unbatched.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["高血压患者可以喝咖啡吗？", "孕妇感冒了能吃什么药？", "儿童发烧38.5度怎么办？", "糖尿病饮食要注意什么？",
             "布洛芬和对乙酰氨基酚有什么区别？", "失眠应该怎么调理？", "哺乳期可以打疫苗吗？", "老年人骨质疏松如何预防？"]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_server(model: str, options: list[str], threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    with open(log, "w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "medtune", "serve", "--model", model, "--port", "0", *options],
                                   env=env, stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        found = re.findall(r"listening on (http://\S+:\d+)", log.read_text())
        if found:
            return process, found[0]
        if process.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not start in 300 s")


async def one_client(client: httpx.AsyncClient, url: str, first: int, count: int, max_tokens: int,
                     results: list) -> None:
    for k in range(count):
        body = {"messages": [{"role": "user", "content": QUESTIONS[(first + k) % len(QUESTIONS)]}],
                "temperature": 0, "max_tokens": max_tokens}
        started = time.perf_counter()
        try:
            response = await client.post(url + "/v1/chat/completions", json=body)
            tokens = response.json()["usage"]["completion_tokens"] if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, KeyError):
            tokens = None
        results.append((time.perf_counter() - started, tokens))


async def load(url: str, clients: int, requests: int, max_tokens: int) -> tuple[float, list]:
    results: list = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*[one_client(client, url, 0, 1, max_tokens, []) for _ in range(2)])  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*[one_client(client, url, c, requests, max_tokens, results) for c in range(clients)])
        return time.perf_counter() - started, results


def measure(model: str, options: list[str], args, log: Path) -> dict:
    process, url = start_server(model, options, args.threads, log)
    try:
        asyncio.run(load(url, 1, 2, args.max_tokens))  # warm-up before the starting RSS
        rss_start = rss_mib(process.pid)
        seconds, results = asyncio.run(load(url, args.clients, args.requests, args.max_tokens))
        rss_end = rss_mib(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=60)
    latencies = sorted(latency for latency, tokens in results if tokens is not None)
    tokens = sum(t for _, t in results if t is not None)
    return {"requests": len(results), "errors": sum(t is None for _, t in results), "seconds": round(seconds, 2),
            "requests_per_s": round(len(latencies) / seconds, 2), "generated_tokens_per_s": round(tokens / seconds, 1),
            "latency_p50_s": round(statistics.median(latencies), 4) if latencies else None,
            "latency_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 4) if latencies else None,
            "rss_start_mib": round(rss_start, 1), "rss_end_mib": round(rss_end, 1),
            "rss_growth": round(rss_end / rss_start - 1, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=500, help="Requests per client.")
    parser.add_argument("--max_tokens", type=int, default=16)
    parser.add_argument("--model", help="Model folder (default: the tiny GLM-4 model, built in a temp folder).")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the server.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if not model:
            sys.path.insert(0, str(REPO / "src"))
            from medtune.models.tiny import build_tiny_model

            model = str(build_tiny_model("glm4", Path(scratch) / "glm4"))
        queue = ["--max_queue", str(args.clients)]
        batched = measure(model, ["--max_batch_size", str(args.clients), *queue], args, Path(scratch) / "b.log")
        unbatched = measure(model, ["--no_batching", *queue], args, Path(scratch) / "u.log")
    print(json.dumps({"clients": args.clients, "requests_per_client": args.requests, "max_tokens": args.max_tokens,
                      "server_threads": args.threads, "batched": batched, "unbatched": unbatched,
                      "batched_over_unbatched_tokens_per_s": round(batched["generated_tokens_per_s"]
                                                                   / unbatched["generated_tokens_per_s"], 2)},
                     indent=2))


if __name__ == "__main__":
    main()
