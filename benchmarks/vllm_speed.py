"""Dual path on vLLM ÷ dual path on the HF engine: decode tokens/s at batch 4, and KV-cache
memory per token on vLLM ÷ the plain model's, on the ~58M Llama of common.py (CPU).

    python benchmarks/vllm_speed.py [--json] [--threads 2] [--rounds 5] [--dtype float32 bfloat16] [--multiprocess]

Goal (issue 7): tokens/s ratio ≥ 2. Each round generates 128 tokens for the same 4 prompts at
λ = 0.5 on one engine, then on the other, in each dtype (float32, and bfloat16, vLLM's default
on CPU); the ratio is the median of the rounds' ratios, so load on the machine hits both alike.

Each engine lives in its own process and idles (blocked on a pipe) while the other runs:
- HF uses `--threads` torch threads. It must not share a process with an in-process vLLM,
  which binds the process's OpenMP threads and replaces `torch.set_num_threads`: that made
  the HF side 14% slower and the ratio flattering.
- vLLM runs as `aligndial generate --engine vllm` runs it on CPU (`aligndial.vllm.run.offline_on_cpu`):
  the engine core inside its process (VLLM_ENABLE_V1_MULTIPROCESSING=0, which vLLM's offline
  `LLM` supports) and the worker bound to every core (VLLM_CPU_OMP_THREADS_BIND; vLLM's default
  reserves one of our two cores for its scheduler). On 2 cores, vLLM's default layout, with the
  scheduler and the worker in two processes polling each other, costs ~15-20% of the throughput.
  `--multiprocess` measures vLLM's default layout instead (what `aligndial serve --engine vllm`
  runs); those processes are stopped (SIGSTOP) while HF decodes, because idle they still poll
  for a fifth of a core, which slowed HF by ~8%.

KV memory per token is vLLM's own accounting: the cache space it was given (VLLM_CPU_KVCACHE_SPACE
GiB) ÷ the tokens it fits. The dual path keeps two caches over the shared layers (base path and
aligned path) plus the adapter's: (2L + n) / L of the plain model.
"""

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

BATCH, LAM = 4, 0.5


# --- the engines, each in a child process: `--child hf|vllm DTYPE [DIR]` ----------------------------


def child_hf(dtype: str, threads: int):
    import torch

    from common import NEW_TOKENS, prompt_ids
    from dualpath_speed import adapted

    torch.set_num_threads(threads)
    ids, model = prompt_ids(batch=BATCH), adapted(getattr(torch, dtype))

    def one_round(new_tokens: int) -> dict:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, lam=LAM, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=0)
        elapsed = time.perf_counter() - start
        return {"tok_s": BATCH * new_tokens / elapsed, "tokens": out[:, ids.shape[1]:].tolist()}

    one_round(4)  # warm-up
    serve_rounds(lambda: one_round(NEW_TOKENS), {})


def child_vllm(dtype: str, path: str, plain_path: str | None):
    from aligndial.vllm.run import offline_on_cpu

    offline_on_cpu()  # what `aligndial generate --engine vllm` does; `--multiprocess` already set its variable
    from vllm import LLM, SamplingParams

    from common import NEW_TOKENS, prompt_ids

    def start(p):
        return LLM(p, dtype=dtype, max_model_len=256, max_num_seqs=BATCH, skip_tokenizer_init=True, seed=0)

    def kv_bytes_per_token(llm) -> float:
        cache = llm.llm_engine.vllm_config.cache_config
        return float(os.environ["VLLM_CPU_KVCACHE_SPACE"]) * 2**30 / (cache.num_gpu_blocks * cache.block_size)

    info = {}
    if plain_path:  # vLLM's plain Llama, for the KV-cache comparison
        plain = start(plain_path)
        info["plain_kv"] = kv_bytes_per_token(plain)
        plain.llm_engine.engine_core.shutdown()
        del plain
    llm = start(path)
    info["dual_kv"] = kv_bytes_per_token(llm)
    rows = [{"prompt_token_ids": row} for row in prompt_ids(batch=BATCH).tolist()]

    def one_round(new_tokens: int) -> dict:
        params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True, temperature=0,
                                detokenize=False, extra_args={"alignment_strength": LAM})
        start_time = time.perf_counter()
        outs = llm.generate(rows, params, use_tqdm=False)
        elapsed = time.perf_counter() - start_time
        return {"tok_s": BATCH * new_tokens / elapsed, "tokens": [list(o.outputs[0].token_ids) for o in outs]}

    one_round(4)  # warm-up
    try:
        serve_rounds(lambda: one_round(NEW_TOKENS), info)
    finally:
        llm.llm_engine.engine_core.shutdown()


def serve_rounds(one_round, info: dict):
    """Say ready (with `info`), then run one round per line on stdin until it closes."""
    print(json.dumps({"ready": True, **info}), flush=True)
    for _ in sys.stdin:
        print(json.dumps(one_round()), flush=True)


class Engine:
    """The parent's handle on a child engine process."""

    def __init__(self, *argv: str):
        here = os.path.dirname(os.path.abspath(__file__))
        self.proc = subprocess.Popen([sys.executable, os.path.join(here, "vllm_speed.py"), "--child", *argv],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=here)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"engine {self.proc.args[3:]} exited with {self.proc.wait()}; see its stderr above")
        return json.loads(line)

    def round(self) -> dict:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self._read()

    @contextlib.contextmanager
    def paused(self):
        """SIGSTOP this engine's own child processes (vLLM's multiprocess layout) for the duration."""
        children = psutil.Process(self.proc.pid).children(recursive=True)
        for child in children:
            child.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            for child in children:
                child.send_signal(signal.SIGCONT)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(120)


def measure(dtype: str, args, tmp: str, plain_dir: str | None) -> dict:
    """One dtype: the dual path on both engines, alternating rounds."""
    import torch

    from aligndial.tiny import build_tokenizer
    from aligndial.vllm.export import export_dual_path
    from dualpath_speed import adapted

    dual_dir = export_dual_path(adapted(getattr(torch, dtype)).base, build_tokenizer(), os.path.join(tmp, f"dual-{dtype}"))
    vllm = Engine("vllm", dtype, str(dual_dir), *([plain_dir] if plain_dir else []))
    hf = Engine("hf", dtype, str(args.threads))
    pairs = []
    try:
        for _ in range(args.rounds):
            with vllm.paused():
                hf_out = hf.round()
            vllm_out = vllm.round()
            pairs.append((hf_out["tok_s"], vllm_out["tok_s"]))
            print("measured", dtype, {"hf_tok_s": round(pairs[-1][0], 1), "vllm_tok_s": round(pairs[-1][1], 1)},
                  file=sys.stderr, flush=True)
    finally:
        hf.close()
        vllm.close()
    return {
        "dtype": dtype, "hf_tok_s": round(statistics.median(p[0] for p in pairs), 1),
        "vllm_tok_s": round(statistics.median(p[1] for p in pairs), 1),
        "speed_ratio": round(statistics.median(v / h for h, v in pairs), 2),
        "round_ratios": [round(v / h, 2) for h, v in pairs],
        # Greedy rows identical on both engines (bf16 kernels round differently, so rows may part ways there).
        "same_tokens_rows": sum(a == b for a, b in zip(hf_out["tokens"], vllm_out["tokens"])),
        **vllm.info,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the HF engine")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (median)")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--multiprocess", action="store_true", help="vLLM's default process layout (see the docstring)")
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if args.multiprocess else "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from common import llama_50m, table

    with tempfile.TemporaryDirectory() as tmp:
        plain_dir = os.path.join(tmp, "plain")
        llama_50m(0).save_pretrained(plain_dir)
        rows = [measure(dtype, args, tmp, plain_dir if i == 0 else None) for i, dtype in enumerate(args.dtype)]
    plain_kv_fp32 = rows[0]["plain_kv"] * 32 / {"float32": 32, "bfloat16": 16}[rows[0]["dtype"]]
    for row in rows:  # KV bytes scale with the dtype's size: compare like with like
        row["plain_kv"] = plain_kv_fp32 * {"float32": 1, "bfloat16": 0.5}[row["dtype"]]
        row["kv_ratio"] = round(row["dual_kv"] / row["plain_kv"], 3)
    result = {"batch": BATCH, "lam": LAM, "hf_threads": args.threads, "multiprocess": args.multiprocess, "rows": rows}
    if args.json:
        print(json.dumps(result))
        return
    lines = [(f"dual path tok/s, batch 4, λ=0.5, {r['dtype']} (same greedy rows: {r['same_tokens_rows']}/{BATCH})",
              r["hf_tok_s"], r["vllm_tok_s"], r["speed_ratio"], "≥ 2") for r in rows]
    lines += [(f"KV-cache bytes per token, {r['dtype']}", f"{round(r['plain_kv'])} (plain)", round(r["dual_kv"]),
               r["kv_ratio"], "(2L+n)/L") for r in rows]
    layout = "multiprocess" if args.multiprocess else "in-process engine core"
    print(f"vLLM ({layout}) ÷ HF engine ({args.threads} threads); rounds {[r['round_ratios'] for r in rows]}")
    print(table(lines, ("what", "HF engine / plain", "vLLM", "ratio", "goal")))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is the pipe to the parent
        kind, dtype, *rest = sys.argv[2:]
        if kind == "hf":
            child_hf(dtype, int(rest[0]))
        else:
            child_vllm(dtype, rest[0], rest[1] if len(rest) > 1 else None)
    else:
        main()
