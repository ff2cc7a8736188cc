"""`aligndial demo build`: train the demo's tiny models from scratch with the project's own recipes.

    aligndial demo build                          # the bundled models, into src/aligndial/demo/models
    aligndial demo build --seed 1 --out /tmp/m    # another seed, elsewhere (`aligndial demo --models /tmp/m`)
    aligndial demo build --small --out /tmp/s     # a much smaller run: the smoke test of every stage
    aligndial demo build --stage large            # add (or rebuild) one stage in an existing bundle

Stages, each a recipe of `aligndial.train` on data from `aligndial.demo.task`:

1. `ref`:     a byte-level BPE tokenizer and a random tiny Llama (`aligndial.tiny`), then full SFT
              on replies in both styles (`train_sft`, full=True): the reference model.
2. `aligned`: full DPO from `ref` on careful-vs-direct preferences (`train_dpo`, full=True), with
              an NLL term on the chosen reply (TRL loss_type ["sigmoid", "sft"]). Why the NLL term:
              with pure DPO the first-token gradients of the chosen and rejected replies cancel on
              every other token, so probability leaks to tokens neither reply starts with; λ=2
              squares that leak (measured in docs/reproduction.md, section a).
3. `adapter`: a one-layer adapter on `ref`, trained alone by SFT on the chosen replies (`train_sft`,
              adapter mode; FR §4.2 trains InRa adapters by SFT). Adapter-only DPO damaged the
              arithmetic at this scale (docs/reproduction.md, section b).
4. `trra`:    a full student distilled from the pair (ref, aligned) at λ=`trra_lam` (`train_distill`).
5. `large`:   a larger reference (`large_hidden`, `large_layers`) over `ref`'s tokenizer, trained by
              `ref`'s recipe (at its own `large_lr`) on the same data: the model the small pair steers in the demo's
              weak-to-strong row (proxy-tuning / EFT: h_large + λ·(h_aligned − h_ref)). Steering
              needs one tokenizer for all three models, so it reuses `ref`'s instead of training one.

`--stage NAME` trains one stage into an existing bundle, with the bundle's own seed and settings,
from the stages it depends on there, and updates the manifest; the other files stay as they are.
A full build of the same seed writes the same files as building the stages one by one.

Everything is seeded (data, initialisation, trainer) and runs on one thread, so the same seed
gives byte-identical files on any machine of the same kind.

Why one thread: these models are so small that a second thread buys little, and on a shared
machine OpenMP threads spin while they wait for a busy core, which multiplies the CPU time a
build costs (docs/benchmarks.md, "Demo build").

The output directory gets one sub-directory per stage with only what loading needs, and
`manifest.json`: command, seed, configuration, versions, timings and the sha256 of every file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import resource
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

BUNDLE = Path(__file__).parent / "models"
STAGES = ("ref", "aligned", "adapter", "trra", "large")
# What each stage trains from (besides the data): `--stage` needs these in the bundle.
NEEDS = {"ref": (), "aligned": ("ref",), "adapter": ("ref",), "trra": ("ref", "aligned"), "large": ("ref",)}
DESCRIPTIONS = {
    "ref": "tiny Llama trained from scratch by full SFT on replies in both styles (train_sft, full=True)",
    "aligned": "full DPO from ref, beta={dpo_beta}, loss sigmoid + NLL on the chosen reply (train_dpo, full=True)",
    "adapter": "one-layer adapter on ref, adapter-only SFT on the chosen replies (train_sft, adapter mode)",
    "trra": "full student distilled from (ref, aligned) at lam={trra_lam} (train_distill, student='full')",
    "large": ("larger Llama (hidden {large_hidden}, {large_layers} layers) over ref's tokenizer, trained from "
              "scratch by ref's recipe at lr {large_lr} on the same data (train_sft, full=True): the model the "
              "(aligned, ref) pair steers"),
}
FORMAT = "aligndial-demo-bundle"
# What loading needs; checkpoints, optimizer states and the trainer's pickled args stay behind.
KEEP = {
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    "chat_template.jinja", "adapter_config.json", "adapter_model.safetensors", "training_summary.json",
}


@dataclass
class BuildConfig:
    """Sizes and hyperparameters of one build. `FULL` is the bundled one, `SMALL` the smoke test.

    Model: `vocab_size`, `hidden`, `layers`, `heads`. Data: `sft_rows`, `pref_rows`, `distill_rows`.
    Training: per-stage learning rates and epochs, `dpo_beta`, `trra_lam`, `batch_size`.
    """

    vocab_size: int = field(default=400, metadata={"help": "BPE vocabulary (every number 0-25 becomes one token)."})
    hidden: int = field(default=128, metadata={"help": "Llama hidden size."})
    layers: int = field(default=4, metadata={"help": "Decoder layers of the reference."})
    heads: int = field(default=4, metadata={"help": "Attention heads."})
    sft_rows: int = field(default=24000, metadata={"help": "Reference SFT examples (one epoch)."})
    sft_lr: float = field(default=3e-3, metadata={"help": "Reference SFT learning rate (from scratch)."})
    pref_rows: int = field(default=3000, metadata={"help": "Preference pairs for DPO; their chosen replies train the adapter."})
    dpo_beta: float = field(default=0.5, metadata={"help": "DPO β of the aligned model."})
    dpo_lr: float = field(default=1e-4, metadata={"help": "Full DPO learning rate (1e-3 collapsed the model)."})
    adapter_lr: float = field(default=5e-4, metadata={"help": "Adapter-only SFT learning rate."})
    align_epochs: float = field(default=2.0, metadata={"help": "Epochs of DPO and of adapter SFT."})
    distill_rows: int = field(default=2000, metadata={"help": "TrRa sequences (both styles, off-policy)."})
    trra_lam: float = field(default=2.0, metadata={"help": "λ of the TrRa teacher π_λ."})
    trra_lr: float = field(default=3e-4, metadata={"help": "TrRa learning rate."})
    batch_size: int = field(default=32, metadata={"help": "Per-step batch of DPO, adapter SFT and TrRa (SFT uses twice this)."})
    large_hidden: int = field(default=192, metadata={"help": "Hidden size of the larger reference the small pair steers."})
    large_layers: int = field(default=6, metadata={"help": "Decoder layers of the larger reference."})
    large_heads: int = field(default=4, metadata={"help": "Attention heads of the larger reference."})
    large_lr: float = field(default=1.5e-3, metadata={"help": "SFT learning rate of the larger reference (at ref's 3e-3 "
                                                             "its loss stalled above ref's: a larger model wants a smaller step)."})


FULL = BuildConfig()
SMALL = BuildConfig(vocab_size=300, hidden=32, layers=2, heads=2, sft_rows=256, pref_rows=64, distill_rows=64, align_epochs=1.0,
                    large_hidden=48, large_layers=3, large_heads=2)


def write_jsonl(rows: list[dict], path: Path) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def make_data(work: Path, cfg: BuildConfig, seed: int) -> dict[str, str]:
    from aligndial.demo import task

    prefs = task.preference_rows(cfg.pref_rows, seed)
    return {
        "sft": write_jsonl(task.sft_rows(cfg.sft_rows, seed), work / "sft.jsonl"),
        "prefs": write_jsonl(prefs, work / "prefs.jsonl"),
        "chosen": write_jsonl([{"prompt": r["prompt"], "completion": r["chosen"]} for r in prefs], work / "chosen.jsonl"),
        "distill": write_jsonl(task.distill_rows(cfg.distill_rows, seed), work / "distill.jsonl"),
    }


def trainer_args(out: Path, seed: int, **kw) -> dict:
    """What every stage shares: seeded, no checkpoints (nothing resumes a run of minutes), quiet."""
    return dict(output_dir=str(out), seed=seed, data_seed=seed, save_strategy="no", disable_tqdm=True,
                logging_steps=25, lr_scheduler_type="cosine", warmup_steps=0.05, max_length=128, **kw)


def train_ref(work: Path, data: dict, cfg: BuildConfig, seed: int) -> str:
    """Tokenizer + random Llama, then full SFT: the reference model."""
    from aligndial.demo.task import corpus
    from aligndial.tiny import build_tokenizer

    rows = [json.loads(line) for line in open(data["sft"])]
    tok = build_tokenizer(corpus(rows), vocab_size=cfg.vocab_size)
    return sft_from_scratch(tok, work / "init", work / "ref", data, cfg, seed, cfg.hidden, cfg.layers, cfg.heads, cfg.sft_lr)


def train_large(ref: str, work: Path, data: dict, cfg: BuildConfig, seed: int) -> str:
    """A larger random Llama over `ref`'s tokenizer, then `ref`'s SFT recipe on the same data.
    Weak-to-strong steering mixes its logits with the small pair's token by token, so the three
    models must share one tokenizer: it is loaded from `ref`, not trained again."""
    from transformers import AutoTokenizer

    return sft_from_scratch(AutoTokenizer.from_pretrained(ref), work / "large-init", work / "large", data, cfg, seed,
                            cfg.large_hidden, cfg.large_layers, cfg.large_heads, cfg.large_lr)


def sft_from_scratch(tok, init_dir: Path, out: Path, data: dict, cfg: BuildConfig, seed: int, hidden: int, layers: int,
                     heads: int, lr: float) -> str:
    """The reference recipe: a random Llama of this size over `tok`, one epoch of full SFT."""
    from aligndial.tiny import build_model, save
    from aligndial.train.sft import AdapterSFTConfig, train_sft

    model = build_model("llama", tok, seed=seed, hidden=hidden, layers=layers, heads=heads,
                        initializer_range=0.02)  # the usual init for training (tiny's 0.2 is for tests)
    init = save(model, tok, init_dir)
    args = trainer_args(out, seed, full=True, learning_rate=lr, num_train_epochs=1,
                        per_device_train_batch_size=2 * cfg.batch_size)
    return train_sft(str(init), data["sft"], AdapterSFTConfig(**args))


def train_aligned(ref: str, prefs: str, out: Path, cfg: BuildConfig, seed: int, beta: float | None = None,
                  nll: bool = True, layers: str = "full") -> str:
    """DPO from `ref` at `beta` (default `cfg.dpo_beta`), with the NLL term unless `nll=False`.
    `layers`: "full" (every parameter), "adapter" (a new bottom layer alone) or "bottom:K" / "top:K"."""
    from aligndial.train.dpo import AdapterDPOConfig, train_dpo

    mode = {"full": {"full": True}, "adapter": {}}.get(layers, {"tune_layers": layers})
    args = trainer_args(out, seed, beta=cfg.dpo_beta if beta is None else beta, learning_rate=cfg.dpo_lr,
                        num_train_epochs=cfg.align_epochs, per_device_train_batch_size=cfg.batch_size,
                        loss_type=["sigmoid", "sft"] if nll else ["sigmoid"], **mode)
    return train_dpo(ref, prefs, AdapterDPOConfig(**args))


def train_adapter(ref: str, chosen: str, out: Path, cfg: BuildConfig, seed: int) -> str:
    """Adapter-only SFT on the chosen replies (the base stays frozen)."""
    from aligndial.train.sft import AdapterSFTConfig, train_sft

    args = trainer_args(out, seed, learning_rate=cfg.adapter_lr, num_train_epochs=cfg.align_epochs,
                        per_device_train_batch_size=cfg.batch_size)
    return train_sft(ref, chosen, AdapterSFTConfig(**args))


def train_trra(ref: str, aligned: str, distill: str, out: Path, cfg: BuildConfig, seed: int,
               lam: float | None = None, iterations: int = 1) -> str:
    """A full student distilled toward π_λ of (ref, aligned) (FR §3.1); `iterations` > 1 is TrRa-iter."""
    from aligndial.train.distill import TrRaConfig, train_distill

    args = trainer_args(out, seed, lam=cfg.trra_lam if lam is None else lam, iterations=iterations, student="full",
                        learning_rate=cfg.trra_lr, num_train_epochs=1, per_device_train_batch_size=cfg.batch_size)
    return train_distill(ref, aligned, distill, TrRaConfig(**args))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_table(root: Path) -> dict[str, dict]:
    return {
        str(p.relative_to(root)): {"sha256": sha256(p), "bytes": p.stat().st_size}
        for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"
    }


def check_bundle(root: Path) -> dict:
    """The manifest of a built bundle, after checking every file against it. Raises a
    FileNotFoundError or ValueError that says how to rebuild."""
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"no demo models in {root} (manifest.json is missing). Build them with `aligndial demo build"
            f"{'' if root == BUNDLE else f' --out {root}'}` (it takes minutes; docs/benchmarks.md), then run `aligndial demo` again."
        )
    manifest = json.loads(manifest_path.read_text())
    found = file_table(root)
    expected = manifest["files"]
    problems = [f"{name}: missing" for name in expected if name not in found]
    problems += [f"{name}: sha256 differs" for name in expected
                 if name in found and found[name]["sha256"] != expected[name]["sha256"]]
    problems += [f"{name}: not in the manifest" for name in found if name not in expected]
    if problems:
        raise ValueError(
            f"the demo models in {root} do not match their manifest ({'; '.join(problems[:4])}). "
            "Restore them with `git checkout` or rebuild with `aligndial demo build`."
        )
    return manifest


def versions() -> dict[str, str]:
    from importlib.metadata import version

    packages = ("aligndial", "torch", "transformers", "trl", "datasets", "tokenizers", "accelerate", "safetensors", "numpy")
    return {"python": platform.python_version(), **{p: version(p) for p in packages}}


def compare_manifests(old: dict, new: dict) -> str:
    """One line: does a rebuild reproduce the previous bundle's files, and if not, is that explained
    by other library versions? The same seed and settings give byte-identical files only under the
    same versions: another transformers or torch can initialise, order or round differently."""
    old_files, new_files = old.get("files", {}), new["files"]
    changed = sorted(k for k in new_files if old_files.get(k, {}).get("sha256") != new_files[k]["sha256"])
    changed += sorted(k for k in old_files if k not in new_files)
    if not changed:
        return f"every file matches the previous bundle's sha256 ({len(new_files)} files)"
    head = f"{len(changed)} of {len(new_files)} files differ from the previous bundle's sha256 ({', '.join(changed[:3])}"
    head += ", ...)" if len(changed) > 3 else ")"
    if (old.get("seed"), old.get("small"), old.get("config")) != (new["seed"], new["small"], new["config"]):
        return f"{head}: it was built with other settings (`{old.get('command')}`), so this is expected"
    old_v, new_v = old.get("versions", {}), new["versions"]
    diff = [f"{k} {old_v[k]} there, {new_v[k]} here" for k in new_v if k in old_v and old_v[k] != new_v[k]]
    if diff:
        return (f"{head}: the library versions differ ({'; '.join(diff)}), which changes the weights' bytes; "
                "install the recorded versions to reproduce it byte for byte")
    if "versions" not in old:
        return f"{head}: the previous manifest records no library versions, so the cause cannot be told"
    return (f"{head} although seed, settings and library versions match: the machine differs "
            f"({old.get('machine', {}).get('platform')} there) or the build is not deterministic here")


def set_fields(path: Path, **fields) -> None:
    """Update some fields of a JSON file."""
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}, indent=2) + "\n")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextmanager
def quiet_single_thread():
    """One torch thread (see the module docstring), no progress bar per tokenised dataset or saved
    model, no deprecation notices from inside transformers/TRL: the stage log stays readable."""
    import torch
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar
    from transformers.utils import logging as hf_logging

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    disable_progress_bar()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        torch.set_num_threads(threads)
        enable_progress_bar()
        hf_logging.enable_progress_bar()


def describe(stage: str, cfg: BuildConfig) -> str:
    return DESCRIPTIONS[stage].format(**dataclasses.asdict(cfg))


def train_stage(stage: str, dirs: dict[str, str], work: Path, data: dict, cfg: BuildConfig, seed: int, log) -> tuple[str, float]:
    """Train one stage from the stages in `dirs` it needs (`NEEDS`); (its output directory, seconds)."""
    log(f"[demo build] {stage} ...")
    t = time.perf_counter()
    if stage == "ref":
        done = train_ref(work, data, cfg, seed)
    elif stage == "aligned":
        done = train_aligned(dirs["ref"], data["prefs"], work / stage, cfg, seed)
    elif stage == "adapter":
        done = train_adapter(dirs["ref"], data["chosen"], work / stage, cfg, seed)
    elif stage == "trra":
        done = train_trra(dirs["ref"], dirs["aligned"], data["distill"], work / stage, cfg, seed)
    else:
        done = train_large(dirs["ref"], work, data, cfg, seed)
    seconds = round(time.perf_counter() - t, 1)
    log(f"[demo build] {stage} done in {seconds} s")
    return done, seconds


def keep_files(stage: str, src: Path, dest: Path) -> None:
    """Copy what loading needs (`KEEP`) from a stage's training directory into the bundle's."""
    dest.mkdir()
    for p in src.iterdir():
        if p.name in KEEP:
            shutil.copy2(p, dest / p.name)
    # Two files record where a model was during training (a temporary path); name its bundle directory instead.
    if stage == "adapter":
        set_fields(dest / "adapter_config.json", base_model="ref")
    if stage == "trra":
        set_fields(dest / "training_summary.json", teacher_aligned="aligned")


def build(out: str | Path = BUNDLE, seed: int = 0, small: bool = False, log=print) -> dict:
    """Train every stage into a temporary directory, then move the results to `out` (replacing
    what was there) with their manifest. Returns the manifest."""
    with quiet_single_thread():
        return _build(Path(out), seed, small, log)


def _build(out: Path, seed: int, small: bool, log) -> dict:
    import torch

    cfg = SMALL if small else FULL
    out.parent.mkdir(parents=True, exist_ok=True)
    started, cpu_started, seconds = time.perf_counter(), _cpu_seconds(), {}
    with tempfile.TemporaryDirectory(prefix="aligndial-demo-build-") as tmp:
        work = Path(tmp)
        data = make_data(work, cfg, seed)
        dirs = {}
        for stage in STAGES:
            dirs[stage], seconds[stage] = train_stage(stage, dirs, work, data, cfg, seed, log)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        for stage, src in dirs.items():
            keep_files(stage, Path(src), staging / stage)
    seconds["total"] = round(time.perf_counter() - started, 1)
    seconds["cpu_total"] = round(_cpu_seconds() - cpu_started, 1)  # wall time depends on who else shares the cores
    manifest = {
        "format": FORMAT,
        "command": " ".join(["aligndial demo build", f"--seed {seed}"] + (["--small"] if small else [])),
        "seed": seed,
        "small": small,
        "config": dataclasses.asdict(cfg),
        "stages": {stage: describe(stage, cfg) for stage in STAGES},
        "versions": versions(),
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()},
        "seconds": seconds,
        "files": file_table(staging),
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    staging.chmod(0o755)  # mkdtemp makes it private; the bundle is package data
    if (out / "manifest.json").is_file():
        log(f"[demo build] {compare_manifests(json.loads((out / 'manifest.json').read_text()), manifest)}")
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    log(f"[demo build] wrote {out} in {seconds['total']} s "
        f"({sum(f['bytes'] for f in manifest['files'].values()) / 1e6:.1f} MB)")
    return manifest


def build_stage(out: str | Path = BUNDLE, stage: str = "large", log=print) -> dict:
    """Train one stage into the existing bundle `out`, with the bundle's own seed and settings,
    from the stages it needs there (`NEEDS`); every other file stays as it is. The manifest gains
    (or renews) the stage's description, seconds and files, and records the command under
    `stage_builds`. Returns the new manifest."""
    if stage not in STAGES:
        raise ValueError(f"--stage {stage!r} is not a demo stage; choose one of {', '.join(STAGES)}")
    out = Path(out)
    old = check_bundle(out)
    cfg = SMALL if old["small"] else FULL
    settings = dataclasses.asdict(cfg)
    differ = [f"{k}={v!r} there, {settings[k]!r} here" for k, v in old["config"].items() if settings.get(k, v) != v]
    if differ:
        raise ValueError(f"the bundle in {out} was built with other settings ({'; '.join(differ)}), so a stage built "
                         f"here would not match it; rebuild the whole bundle with `{old['command']}`")
    missing = [need for need in NEEDS[stage] if not any(name.startswith(f"{need}/") for name in old["files"])]
    if missing:
        raise ValueError(f"--stage {stage} trains from {', '.join(NEEDS[stage])}, but the bundle in {out} has no "
                         f"{', '.join(missing)}; build the whole bundle with `{old['command']}`")
    with quiet_single_thread():
        return _build_stage(out, stage, old, cfg, log)


def _build_stage(out: Path, stage: str, old: dict, cfg: BuildConfig, log) -> dict:
    import torch

    started_cpu = _cpu_seconds()
    with tempfile.TemporaryDirectory(prefix=f"aligndial-demo-stage-{stage}-") as tmp:
        work = Path(tmp)
        data = make_data(work, cfg, old["seed"])
        src, seconds = train_stage(stage, {need: str(out / need) for need in NEEDS[stage]}, work, data, cfg, old["seed"], log)
        staging = Path(tempfile.mkdtemp(prefix=f".{stage}.", dir=out.parent))
        try:
            keep_files(stage, Path(src), staging / stage)
            (staging / stage).chmod(0o755)
            if (out / stage).exists():
                shutil.rmtree(out / stage)
            os.replace(staging / stage, out / stage)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    cpu = round(_cpu_seconds() - started_cpu, 1)
    earlier = old.get("stage_builds", {}).get(stage, {})
    manifest = json.loads(json.dumps(old))
    manifest["config"] = dataclasses.asdict(cfg)
    manifest["stages"][stage] = describe(stage, cfg)
    previous = manifest["seconds"].get(stage)
    manifest["seconds"][stage] = seconds
    manifest["seconds"]["total"] = round(manifest["seconds"]["total"] - (previous or 0) + seconds, 1)
    manifest["seconds"]["cpu_total"] = round(manifest["seconds"]["cpu_total"] - earlier.get("cpu_seconds", 0) + cpu, 1)
    command = f"aligndial demo build --stage {stage}" + ("" if out.resolve() == BUNDLE.resolve() else f" --out {out}")
    manifest.setdefault("stage_builds", {})[stage] = {
        "command": command, "cpu_seconds": cpu, "versions": versions(),
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()},
    }
    manifest["files"] = file_table(out)
    changed = [k for k in old["files"] if manifest["files"].get(k) != old["files"][k] and not k.startswith(f"{stage}/")]
    if changed:  # file_table reads the whole bundle: nothing outside the stage may have moved
        raise RuntimeError(f"building {stage} changed other files of the bundle: {', '.join(changed)}")
    tmp_manifest = out / ".manifest.json.tmp"
    tmp_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp_manifest, out / "manifest.json")
    mine = {k: v for k, v in manifest["files"].items() if k.startswith(f"{stage}/")}
    before = {k: v for k, v in old["files"].items() if k.startswith(f"{stage}/")}
    if before:
        log(f"[demo build] {stage}: {'every file matches' if before == mine else 'the files differ from'} the previous build's")
    log(f"[demo build] added {stage} to {out} in {seconds} s "
        f"({sum(f['bytes'] for k, f in manifest['files'].items() if k.startswith(f'{stage}/')) / 1e6:.1f} MB)")
    return manifest
