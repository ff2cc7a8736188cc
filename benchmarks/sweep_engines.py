"""A λ sweep on the vLLM engine ÷ the same sweep on the HF engine (wall time), side by side with
vllm_speed.py's dual-path decode ratio (batch 4), on the ~58M Llama of common.py with a one-layer
adapter (the dual path), on CPU.

    python benchmarks/sweep_engines.py [--json] [--rounds 3] [--lams 6] [--prompts 32] [--new-tokens 64]

Goals (issue 20): the sweep, 6 λ × 32 prompts × 64 new tokens, ≥ 3× faster on vLLM; the dual-path
decode ratio (vllm_speed.py, batch 4, λ=0.5) stays ≥ 2.

Each engine lives in its own process and idles (blocked on a pipe) while the other runs (see
vllm_speed.py: an in-process vLLM rebinds the process's OpenMP threads). A round is one
`aligndial.evaluate.sweep` over every (λ, prompt) with metric `length` (nothing scored on a
model), the engine loaded and warm: the HF engine generates `--batch-size` rows per call (one
call per λ here), the vLLM engine (`aligndial.engines`' `vllm`, as `aligndial sweep --engine vllm`
runs it) all rows in one batch. vLLM's prefix cache is emptied before each round, so no round
reuses another's KV; within a round a prompt's KV blocks are shared across its λ, as in use.
Rounds alternate between the engines; the ratio is the median of the rounds' ratios. The engines'
start-up (model load; vLLM's engine start) is reported once, apart.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from aligndial.tiny import DEFAULT_TEXT


def sweep_prompts(n: int) -> list[dict]:
    words = DEFAULT_TEXT.split()
    return [{"prompt": " ".join(words[(3 * i) % 60 : (3 * i) % 60 + 3 + i % 6])} for i in range(n)]


def lam_grid(n: int) -> list[float]:
    return [round(-0.5 + 2.5 * k / (n - 1), 3) for k in range(n)] if n > 1 else [0.5]


# --- the engines, each in a child process: `--child hf|vllm DTYPE REF ADAPTER EXPORT THREADS` -----------


def child(kind: str, dtype: str, ref: str, adapter: str, export: str, threads: int, config_json: str):
    import torch

    from aligndial.engines import Settings, TransformersEngine
    from aligndial.evaluate import SweepConfig, sweep
    from aligndial.loading import load_tokenizer

    spec = json.loads(config_json)
    prompts = sweep_prompts(spec.pop("prompts"))
    config = SweepConfig(metrics=["length"], **spec)
    start = time.perf_counter()
    if kind == "hf":
        from transformers import AutoModelForCausalLM

        from aligndial.dualpath import DualPathModel

        torch.set_num_threads(threads)
        model = DualPathModel.from_adapter(AutoModelForCausalLM.from_pretrained(ref, dtype=getattr(torch, dtype)), adapter)
        engine = TransformersEngine(model, load_tokenizer(ref), 1)
    else:
        from aligndial.vllm.engine import VLLMBatchEngine

        args = argparse.Namespace(dtype=dtype, seed=0, tensor_parallel_size=1, ref=None, adapter=adapter)
        engine = VLLMBatchEngine(export, load_tokenizer(export), 1, args)
    engine.rows(["Hello"], [0.5], Settings(max_new_tokens=4))  # warm-up (starts vLLM)
    startup = time.perf_counter() - start

    def one_round() -> dict:
        if engine.name == "vllm":
            engine.llm.reset_prefix_cache()
        t0 = time.perf_counter()
        rows, _ = sweep(engine, engine.tokenizer, prompts, config)
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "tokens": sum(len(r["token_ids"]) for r in rows),
                "rows": [r["token_ids"] for r in rows]}

    print(json.dumps({"ready": True, "startup_seconds": round(startup, 1)}), flush=True)
    try:
        for _ in sys.stdin:
            print(json.dumps(one_round()), flush=True)
    finally:
        engine.close()


class Engine:
    """The parent's handle on a child engine process."""

    def __init__(self, *argv: str):
        here = os.path.dirname(os.path.abspath(__file__))
        self.proc = subprocess.Popen([sys.executable, os.path.join(here, "sweep_engines.py"), "--child", *argv],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=here)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"engine {self.proc.args[3:5]} exited with {self.proc.wait()}; see its stderr above")
        return json.loads(line)

    def round(self) -> dict:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(120)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the HF engine")
    parser.add_argument("--rounds", type=int, default=3, help="alternating sweep rounds (median)")
    parser.add_argument("--lams", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--hf-batch-size", type=int, default=32, help="the HF sweep's --batch-size (rows per call)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--decode-rounds", type=int, default=3, help="rounds of vllm_speed.py's batch-4 decode ratio")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import torch

    from aligndial.adapter import load_adapter, save_adapter
    from aligndial.tiny import build_tokenizer
    from aligndial.vllm.export import export_dual_path
    from common import llama_50m
    from dualpath_speed import with_adapter
    from vllm_speed import measure

    load_before = os.getloadavg()
    spec = {"lams": lam_grid(args.lams), "prompts": args.prompts, "max_new_tokens": args.new_tokens,
            "batch_size": args.hf_batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        dtype = getattr(torch, args.dtype)
        tok, ref, adapter = build_tokenizer(), os.path.join(tmp, "ref"), os.path.join(tmp, "adapter")
        save_adapter(with_adapter(dtype), adapter)  # dualpath_speed's perturbed adapter on llama_50m(0)
        llama_50m(0, dtype).save_pretrained(ref)  # the same seeded base weights
        tok.save_pretrained(ref)
        merged = llama_50m(0, dtype)
        load_adapter(merged, adapter)
        export = str(export_dual_path(merged, tok, os.path.join(tmp, "dual-vllm")))
        hf = Engine("hf", args.dtype, ref, adapter, export, str(args.threads), json.dumps(spec))
        vllm = Engine("vllm", args.dtype, ref, adapter, export, str(args.threads), json.dumps(spec))
        pairs, same = [], None
        try:
            for _ in range(args.rounds):
                h, v = hf.round(), vllm.round()
                pairs.append((h["seconds"], v["seconds"]))
                same = sum(a == b for a, b in zip(h["rows"], v["rows"]))
                print("measured sweep", {"hf_s": round(h["seconds"], 1), "vllm_s": round(v["seconds"], 1),
                                         "tokens": (h["tokens"], v["tokens"])}, file=sys.stderr, flush=True)
        finally:
            hf.close()
            vllm.close()
        decode = measure(args.dtype, argparse.Namespace(threads=args.threads, rounds=args.decode_rounds), tmp, None)
    rows_total = len(spec["lams"]) * args.prompts
    result = {
        "sweep": {"lams": spec["lams"], "prompts": args.prompts, "new_tokens": args.new_tokens,
                  "hf_batch_size": args.hf_batch_size, "dtype": args.dtype,
                  "hf_seconds": round(statistics.median(p[0] for p in pairs), 1),
                  "vllm_seconds": round(statistics.median(p[1] for p in pairs), 1),
                  "speedup": round(statistics.median(h / v for h, v in pairs), 2),
                  "round_speedups": [round(h / v, 2) for h, v in pairs],
                  "same_greedy_rows": f"{same}/{rows_total}",
                  "startup_seconds": {"hf": hf.info["startup_seconds"], "vllm": vllm.info["startup_seconds"]}},
        "dual_path_decode": {k: decode[k] for k in ("dtype", "hf_tok_s", "vllm_tok_s", "speed_ratio", "round_ratios")},
        "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]},
        "cpu_count": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(result))
        return
    from common import table

    s, d = result["sweep"], result["dual_path_decode"]
    print(f"load average before {result['load_average']['before']}, after {result['load_average']['after']}; "
          f"sweep rounds {s['round_speedups']}, decode rounds {d['round_ratios']}")
    print(table([
        (f"sweep {len(s['lams'])} λ × {s['prompts']} prompts × {s['new_tokens']} tokens, {s['dtype']}, wall s "
         f"(same greedy rows {s['same_greedy_rows']})", s["hf_seconds"], s["vllm_seconds"], s["speedup"], "≥ 3"),
        (f"dual path decode tok/s, batch 4, λ=0.5, {d['dtype']}", d["hf_tok_s"], d["vllm_tok_s"], d["speed_ratio"], "≥ 2"),
        ("engine start-up s (once, not in the ratios)", s["startup_seconds"]["hf"], s["startup_seconds"]["vllm"], "", ""),
    ], ("what", "HF engine", "vLLM engine", "HF ÷ vLLM time / vLLM ÷ HF tok/s", "goal")))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is the pipe to the parent
        child(*sys.argv[2:7], int(sys.argv[7]), sys.argv[8])
    else:
        main()
