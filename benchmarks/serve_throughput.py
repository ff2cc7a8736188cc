"""Serving throughput: aggregate tokens/s with 8 concurrent clients at mixed λ ÷ with 1 client,
on the same `aligndial serve` process, measured side by side in one run (alternating rounds),
with p50/p95 request latency for both.

    python benchmarks/serve_throughput.py [--adapter] [--threads N] [--rounds 3] [--max-tokens 64] [--json]

The server is the real command in a subprocess, over the ~58M-parameter Llama of common.py
(vocab 32k): a DeRa pair by default, or the base model with a layer adapter (`--adapter`).
Goal (issue 6): ratio ≥ 3. The server runs with one torch thread by default (`--threads`):
on this 2-CPU machine the HTTP loop and the 8 clients need the other CPU, and when torch's
OpenMP threads share CPUs with other work each parallel region waits for its slowest thread. A
step of the ~58M pair measured 46 ms with 1 thread and 380 ms with 2 on a busy machine, so one
thread is faster for 1 client and for 8 alike.
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

from aligndial.adapter import insert_adapter, save_adapter
from aligndial.tiny import build_tokenizer, save
from common import llama_50m, table

LAMS = [0.0, 0.5, 1.0, 1.5, 2.0, -0.5, 0.25, 3.0]  # one per concurrent client
PROMPTS = ["The quick brown fox", "Hello, how are you today?", "Once upon a time there was a small model",
           "Numbers such as 12, 345 and 6789 appear in arithmetic", "A careful assistant answers questions",
           "Tell me a story", "2 + 3 = 5, 7 * 8 = 56", "I am fine, thank you."]


def tokenizer_32k():
    """The tiny offline tokenizer, padded with plain tokens to the 32k vocabulary of `llama_50m`,
    so every id the model can produce decodes to text."""
    tok = build_tokenizer()
    tok.add_tokens([f"<t{i}>" for i in range(32000 - len(tok))])
    assert len(tok) == 32000
    return tok


def write_models(root: str, adapter: bool) -> list[str]:
    tok = tokenizer_32k()
    ref = str(save(llama_50m(0), tok, f"{root}/ref"))
    if adapter:
        model = llama_50m(0)
        insert_adapter(model, num_layers=1, init="copy")  # a non-identity adapter, as after training
        return ["--model", ref, "--adapter", str(save_adapter(model, f"{root}/adapter"))]
    return ["--ref", ref, "--aligned", str(save(llama_50m(1), tok, f"{root}/aligned"))]


async def one_request(client: httpx.AsyncClient, prompt: str, lam: float, max_tokens: int) -> tuple[int, float]:
    start = time.perf_counter()
    r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                                  "alignment_strength": lam})
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"], time.perf_counter() - start


async def load(url: str, clients: int, requests_each: int, max_tokens: int) -> tuple[float, list[float]]:
    """`clients` concurrent clients, each sending `requests_each` requests one after another.
    Returns (aggregate generated tokens/s, per-request latencies)."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def run_client(c: int):
            return [await one_request(client, PROMPTS[(c + i) % len(PROMPTS)], LAMS[(c + i) % len(LAMS)], max_tokens)
                    for i in range(requests_each)]

        start = time.perf_counter()
        results = [x for xs in await asyncio.gather(*(run_client(c) for c in range(clients))) for x in xs]
        elapsed = time.perf_counter() - start
    return sum(n for n, _ in results) / elapsed, [t for _, t in results]


def percentile(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapter", action="store_true", help="serve base + layer adapter instead of a DeRa pair")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the server (OMP_NUM_THREADS)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        flags = write_models(root, args.adapter)
        server = subprocess.Popen([sys.executable, "-m", "aligndial.cli", "serve", *flags, "--port", str(port),
                                   "--max-concurrency", "8"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1",
                                       "OMP_NUM_THREADS": str(args.threads)})
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.5)
            asyncio.run(load(url, 2, 1, 8))  # warm-up
            single, multi, single_lat, multi_lat = [], [], [], []
            for _ in range(args.rounds):  # alternate, so machine noise hits both alike
                tps, lat = asyncio.run(load(url, 1, 2, args.max_tokens))
                single.append(tps), single_lat.extend(lat)
                tps, lat = asyncio.run(load(url, 8, 2, args.max_tokens))
                multi.append(tps), multi_lat.extend(lat)
        finally:
            server.terminate()
            server.wait(60)
    row = {
        "model": "base + adapter" if args.adapter else "DeRa pair",
        "server threads": args.threads,
        "1 client tok/s": round(statistics.median(single), 1),
        "8 clients tok/s": round(statistics.median(multi), 1),
        "ratio": round(statistics.median(m / s for s, m in zip(single, multi)), 2),
        "1 client p50/p95 s": f"{percentile(single_lat, 50):.2f}/{percentile(single_lat, 95):.2f}",
        "8 clients p50/p95 s": f"{percentile(multi_lat, 50):.2f}/{percentile(multi_lat, 95):.2f}",
    }
    if args.json:
        print(json.dumps(row))
    else:
        print(f"aligndial serve throughput, ~58M Llama fp32, {args.max_tokens} new tokens per request, greedy, "
              f"λ in {LAMS}; median of {args.rounds} alternating rounds (goal: ratio ≥ 3); "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(table([tuple(row.values())], tuple(row)))


if __name__ == "__main__":
    main()
