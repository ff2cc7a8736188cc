"""What `--engine vllm` needs in the CLI: a directory vLLM can load, engine arguments, and
`generate` rows with the same contract as `aligndial.generation.generate_rows`.

The model flags are the HF engine's: `--model DIR` (an aligndial export, or a plain model),
`--model M --adapter A` (dual path) or `--ref R --aligned A…` (pair). The last two are exported
to a temporary directory first (export.py), which the caller removes when done.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from aligndial.vllm.export import export_dual_path, export_pair

# config.json dtypes that vLLM's "auto" would change: on CPU it runs float32 checkpoints in bfloat16.
_KEEP_DTYPES = {"float32", "bfloat16", "float16"}


def check_installed(args=None) -> None:
    """`--engine vllm` is usable: vLLM is installed, and no flag that only the HF engine has is set."""
    import importlib.util

    if args is not None and getattr(args, "device", None):
        raise ValueError("`--device` does not apply to `--engine vllm`: vLLM runs on its platform's devices "
                         "(CUDA_VISIBLE_DEVICES chooses GPUs)")

    if importlib.util.find_spec("vllm") is None:
        raise ValueError("`--engine vllm` needs vLLM in this environment: `pip install 'aligndial[vllm]'` on CPU "
                         "(then `pip uninstall -y torchvision torchaudio torchcodec`), or `pip install vllm` on CUDA "
                         "machines; see the README's vLLM section")


def export_n_aligned(model: str) -> int:
    """Aligned models in an aligndial vLLM export (`--model DIR`); 0 for a plain model."""
    config = Path(model) / "config.json"
    spec = json.loads(config.read_text()).get("aligndial") if config.is_file() else None
    return len(spec["default_lam"]) if spec else 0


def model_dir(args, workdir: str, default_lam=None) -> tuple[str, int]:
    """(directory for vLLM, number of aligned models) for the model flags in `args`. `default_lam`
    is what an exported model uses for requests without λ (needed with several aligned models)."""
    from aligndial.loading import load_causal_lm, load_tokenizer

    if args.ref and args.model:
        raise ValueError("Can't provide both `--ref` and `--model`. Choose one.")
    trust = args.trust_remote_code
    if args.ref:
        if not args.aligned:
            raise ValueError("`--ref` needs at least one `--aligned` model")
        from aligndial.pair import check_tokenizers

        tok = load_tokenizer(args.ref, trust)
        for name in args.aligned:
            check_tokenizers(tok, load_tokenizer(name, trust), args.ref, name)
        models = [load_causal_lm(n, args.dtype, trust_remote_code=trust) for n in [args.ref, *args.aligned]]
        out = export_pair(models[0], models[1:], tok, Path(workdir) / "pair", default_lam,
                          names=[args.ref, *args.aligned])
        return str(out), len(args.aligned)
    if not args.model:
        raise ValueError("give `--ref R --aligned A` (DeRa pair) or `--model M [--adapter A]`")
    if args.aligned:
        raise ValueError("`--aligned` goes with `--ref`, not `--model`")
    if getattr(args, "adapter", None):
        from aligndial.adapter import load_adapter

        model = load_causal_lm(args.model, args.dtype, trust_remote_code=trust)
        load_adapter(model, args.adapter)
        return str(export_dual_path(model, load_tokenizer(args.model, trust), Path(workdir) / "dual_path")), 1
    return args.model, export_n_aligned(args.model)


def context_length(path: str, tokenizer) -> int:
    """The longest sequence the model's config and the tokenizer allow (as the HF engine computes it)."""
    config = json.loads((Path(path) / "config.json").read_text())
    limits = [config.get("max_position_embeddings"), tokenizer.model_max_length if tokenizer.model_max_length < 10**9 else None]
    known = [x for x in limits if x]
    if not known:
        raise ValueError(f"cannot tell the context length of {path}: no max_position_embeddings, no model_max_length")
    return min(known)


def engine_kwargs(path: str, dtype: str | None, max_num_seqs: int, max_model_len: int | None = None) -> dict:
    """Keyword arguments for vLLM's `LLM` / `AsyncEngineArgs`. The dtype defaults to the
    checkpoint's own, as on the HF engine."""
    if dtype is None:
        config = Path(path) / "config.json"
        saved = json.loads(config.read_text()) if config.is_file() else {}
        dtype = saved.get("dtype") or saved.get("torch_dtype")
        dtype = dtype if dtype in _KEEP_DTYPES else "auto"
    kw = dict(model=path, dtype=dtype, max_num_seqs=max_num_seqs)
    if max_model_len is not None:
        kw["max_model_len"] = max_model_len
    return kw


def sampling_params(max_tokens: int, lam, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                    seed: int | None = None, **kw):
    """vLLM SamplingParams; λ travels in `extra_args` (what `vllm_xargs` fills over HTTP)."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                          extra_args=None if lam is None else {"alignment_strength": lam}, **kw)


def offline_on_cpu() -> None:
    """On CPU, run the offline engine's core in this process, its worker bound to every core we
    may use (unless the user set these variables). vLLM's default layout puts the scheduler and
    the worker in two processes that poll each other and reserves a core for the scheduler: on
    this 2-core machine that cost ~15-20% of the dual path's tokens/s (benchmarks/vllm_speed.py)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, sorted(os.sched_getaffinity(0)))))


def generate_rows(args, prompts: list, lams: list) -> dict[str, list[dict]]:
    """{json.dumps(lam): one row per prompt} for `aligndial generate --engine vllm`: every
    (prompt, λ) is one request of a single batch, so the rows decode together, each at its own λ."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries only the rows (`--json`)
    offline_on_cpu()
    from vllm import LLM

    from aligndial.generation import render_prompts
    from aligndial.loading import load_tokenizer

    if args.num_beams != 1:
        raise ValueError("`--num-beams` is not supported with `--engine vllm`; use `--engine hf`")
    if args.think_lam is not None:
        raise ValueError("`--think-lam` (λ changing inside a response) is not supported with `--engine vllm`; use `--engine hf`")
    with tempfile.TemporaryDirectory(prefix="aligndial-vllm-") as workdir:
        path, n_aligned = model_dir(args, workdir, default_lam=lams[0])  # every request below gives its λ
        if not n_aligned and any(lam is not None for lam in lams):
            raise ValueError("`--lam` needs a mix: add `--aligned` (with `--ref`) or `--adapter` (with `--model`)")
        tok = load_tokenizer(path, args.trust_remote_code)
        texts = render_prompts(tok, prompts, args.chat)
        ids = [tok(t, add_special_tokens=not args.chat)["input_ids"] for t in texts]
        sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k) if args.do_sample else {}
        params = [
            sampling_params(args.max_new_tokens, lam, seed=None if args.seed is None else args.seed + i, **sampling)
            for lam in lams for i in range(len(ids))
        ]
        llm = LLM(**engine_kwargs(path, args.dtype, max_num_seqs=max(len(params), 1)), seed=args.seed or 0)
        try:
            start = time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": p} for _ in lams for p in ids], params, use_tqdm=False)
            elapsed = time.perf_counter() - start
        finally:
            llm.llm_engine.engine_core.shutdown()  # the engine process, now rather than at exit
    results, k = {}, 0
    for lam in lams:
        rows = []
        for _ in ids:
            token_ids = list(outs[k].outputs[0].token_ids)
            rows.append({"text": tok.decode(token_ids, skip_special_tokens=True), "token_ids": token_ids,
                         "tokens_per_second": round(len(token_ids) / elapsed, 2) if elapsed > 0 else None})
            k += 1
        results[json.dumps(lam)] = rows
    return results
