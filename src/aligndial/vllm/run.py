"""What `--engine vllm` needs: a directory vLLM can load, engine arguments, sampling parameters
with λ, and the CPU process layout. The engine itself is `aligndial.vllm.engine.VLLMBatchEngine`.

The model flags are the HF engine's: `--model DIR` (an aligndial export, or a plain model),
`--model M --adapter A` (dual path) or `--ref R --aligned A…` (pair). The last two are exported
to a temporary directory first (export.py), which the caller removes when done.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

from aligndial.cliargs import n_aligned
from aligndial.vllm.export import export_dual_path, export_pair

# Requests one vLLM batch holds at most (vLLM's max_num_seqs); more wait for a free row.
MAX_NUM_SEQS = 256
# config.json dtypes that vLLM's "auto" would change: on CPU it runs float32 checkpoints in bfloat16.
_KEEP_DTYPES = {"float32", "bfloat16", "float16"}


def export_pair_from_args(args, out, default_lam=None) -> Path:
    """`--ref R --aligned A…` exported to `out` as one model vLLM loads (tokenizers checked first):
    the export flow of `aligndial export-vllm` and of `--engine vllm`."""
    from aligndial.loading import load_causal_lm, load_tokenizer
    from aligndial.vocab import check_tokenizers

    trust, names = args.trust_remote_code, [args.ref, *args.aligned]
    tok = load_tokenizer(args.ref, trust)
    for name in args.aligned:
        check_tokenizers(tok, load_tokenizer(name, trust), args.ref, name)
    models = [load_causal_lm(name, args.dtype, trust_remote_code=trust) for name in names]
    return export_pair(models[0], models[1:], tok, out, default_lam, names=names)


def model_dir(args, workdir: str, default_lam=None) -> tuple[str, int]:
    """(directory for vLLM, number of aligned models) for the model flags in `args`. `default_lam`
    is what an exported model uses for requests without λ (needed with several aligned models)."""
    from aligndial.loading import load_causal_lm, load_tokenizer

    n = n_aligned(args)  # the flags' combination, checked in its one home
    trust = args.trust_remote_code
    if args.ref:
        return str(export_pair_from_args(args, Path(workdir) / "pair", default_lam)), n
    if getattr(args, "adapter", None):
        from aligndial.adapter import load_adapter

        model = load_causal_lm(args.model, args.dtype, trust_remote_code=trust)
        load_adapter(model, args.adapter)
        return str(export_dual_path(model, load_tokenizer(args.model, trust), Path(workdir) / "dual_path")), 1
    from aligndial.gguf import convert, is_gguf

    if is_gguf(args.model):  # vLLM (0.32, CPU) has no GGUF loader: a converted copy it can load
        return convert(args.model, Path(workdir) / "model", args.dtype)["out"], 0
    return args.model, n


def engine_kwargs(path: str, dtype: str | None, max_num_seqs: int, max_model_len: int | None = None,
                  tensor_parallel_size: int = 1, enforce_eager: bool = False) -> dict:
    """Keyword arguments for vLLM's `LLM` / `AsyncEngineArgs`. The dtype defaults to the
    checkpoint's own, as on the HF engine."""
    if dtype is None:
        config = Path(path) / "config.json"
        saved = json.loads(config.read_text()) if config.is_file() else {}
        dtype = saved.get("dtype") or saved.get("torch_dtype")
        dtype = dtype if dtype in _KEEP_DTYPES else "auto"
    kw = dict(model=path, dtype=dtype, max_num_seqs=max_num_seqs)
    if tensor_parallel_size != 1:
        kw["tensor_parallel_size"] = tensor_parallel_size
    if enforce_eager:  # no torch.compile / graph capture: a much faster start, slower decoding
        kw["enforce_eager"] = True
    if max_model_len is not None:
        kw["max_model_len"] = max_model_len
    return kw


def _spec(path: str) -> dict:
    config = Path(path) / "config.json"
    return (json.loads(config.read_text()).get("aligndial") or {}) if config.is_file() else {}


def export_default_lam(path: str) -> list[float] | None:
    """The λ an export uses for requests that give none (None: not an aligndial export)."""
    return _spec(path).get("default_lam")


def member_eos(path: str) -> list[list[int]] | None:
    """Each pair member's EOS ids from an export's config, when they differ (else None: the
    generation config's EOS, which vLLM applies itself, is every member's)."""
    eos = _spec(path).get("member_eos")
    return eos if eos and len({tuple(e) for e in eos}) > 1 else None


def stop_kwargs(eos: list[list[int]] | None, lam, n_aligned: int) -> dict:
    """SamplingParams fields that stop a row on the EOS of the members its λ runs (a non-zero
    weight), reference first: `aligndial.pair.stop_ids`, as in `generate` and the HF engine."""
    if eos is None or lam is None:
        return {}
    from aligndial.pair import stop_ids

    return {"ignore_eos": True, "stop_token_ids": stop_ids(eos, lam, n_aligned)}


def sampling_params(max_tokens: int, lam, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                    seed: int | None = None, **kw):
    """vLLM SamplingParams; λ travels in `extra_args` (what `vllm_xargs` fills over HTTP)."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                          extra_args=None if lam is None else {"alignment_strength": lam}, **kw)


CPU_LAYOUT_VARS = ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND")


@contextmanager
def restored_env(*names: str):
    """Environment variables `names` as they were before the block, whatever it set."""
    saved = {k: os.environ.get(k) for k in names}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def offline_on_cpu() -> None:
    """On CPU, run the offline engine's core in this process, its worker bound to every core we
    may use (unless the user set these variables). vLLM's default layout puts the scheduler and
    the worker in two processes that poll each other and reserves a core for the scheduler, a
    large share of a small machine (measured in benchmarks/vllm_speed.py, docs/vllm.md)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, sorted(os.sched_getaffinity(0)))))


def cpu_tensor_parallel(tensor_parallel_size: int) -> None:
    """On CPU with tensor parallelism, bind each rank's threads to its own share of our cores (unless
    the user set VLLM_CPU_OMP_THREADS_BIND): vLLM's automatic binding wants one NUMA node per rank
    and refuses a single-node machine ("Not enough allowed NUMA nodes to bind threads of 2 local
    CPUWorkers")."""
    from vllm.platforms import current_platform

    if tensor_parallel_size < 2 or not current_platform.is_cpu():
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < tensor_parallel_size:
        raise ValueError(f"`--tensor-parallel-size {tensor_parallel_size}` on CPU needs a core per rank; "
                         f"this process may use {len(cores)}")
    share = len(cores) // tensor_parallel_size
    ranks = [cores[r * share : (r + 1) * share] for r in range(tensor_parallel_size)]
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(",".join(map(str, r)) for r in ranks))
