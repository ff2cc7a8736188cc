"""`aligndial generate`, `interpolate`, `adapter`, `export-vllm` and `serve` flags, end to end;
every argument checked before a model loads."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from aligndial.cli import main


def float64_greedy_mix(models, lam: list[float], input_ids, steps: int) -> list[int]:
    """Greedy ids of (1 − Σλ_i)·h_ref + Σ λ_i·h_i, both (all) plain models recomputed without a
    cache and mixed in float64, up to and including EOS: the oracle for `generate` rows."""
    from aligndial.tiny import EOS_ID

    weights = [1.0 - sum(lam), *lam]
    ids = input_ids
    for _ in range(steps):
        with torch.no_grad():
            mixed = sum(w * m(ids).logits[:, -1].double() for w, m in zip(weights, models))
        ids = torch.cat([ids, mixed.argmax(-1, keepdim=True)], dim=-1)
        if ids[0, -1] == EOS_ID:
            break
    return ids[0, input_ids.shape[1]:].tolist()


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json_contract(capsys, model_dirs, tok):
    ref, aligned, _ = model_dirs["llama"]
    code, out, _ = run(
        capsys, "generate", "--ref", ref, "--aligned", aligned, "--lam", "0", "--lam", "0.5", "--lam", "1",
        "--prompt", "Hello", "--prompt", "The quick brown fox", "--max-new-tokens", "6", "--json",
    )
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["prompt"], r["lam"]) for r in rows] == [
        (p, lam) for p in ("Hello", "The quick brown fox") for lam in (0.0, 0.5, 1.0)
    ]
    for r in rows:
        assert set(r) == {"lam", "prompt", "text", "token_ids", "tokens_per_second"}
        assert 1 <= len(r["token_ids"]) <= 6 and r["tokens_per_second"] > 0
    # Every row is the float64 mix of the plain models' greedy tokens at its λ (λ=0: the
    # reference alone, λ=1: the aligned model alone), whole, up to and including any EOS.
    models = [AutoModelForCausalLM.from_pretrained(path).eval() for path in (ref, aligned)]
    for r in rows:
        ids = tok([r["prompt"]], return_tensors="pt")["input_ids"]
        assert r["token_ids"] == float64_greedy_mix(models, [r["lam"]], ids, 6), r
        assert r["text"] == tok.decode(r["token_ids"], skip_special_tokens=True)
    assert len({tuple(r["token_ids"]) for r in rows}) > 2  # λ changes the tokens: not one model's output


def test_generate_prompts_file_chat_and_several_aligned(capsys, tmp_path, model_dirs):
    ref, a1, a2 = model_dirs["qwen2"]
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "Hi"}) + "\n" + json.dumps({"messages": [{"role": "user", "content": "Yo"}]}) + "\n")
    code, out, _ = run(
        capsys, "generate", "--ref", ref, "--aligned", a1, "--aligned", a2, "--lam", "0.5,0.25",
        "--prompts-file", str(f), "--chat", "--max-new-tokens", "4", "--json",
    )
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["lam"] for r in rows] == [[0.5, 0.25], [0.5, 0.25]]
    # (1 − 0.5 − 0.25)·h_ref + 0.5·h_1 + 0.25·h_2 in float64, on the chat-rendered prompts.
    from aligndial.generation import render_prompts
    from aligndial.loading import load_tokenizer

    tok = load_tokenizer(ref)
    models = [AutoModelForCausalLM.from_pretrained(path).eval() for path in (ref, a1, a2)]
    texts = render_prompts(tok, ["Hi", [{"role": "user", "content": "Yo"}]], chat=True)
    for row, text in zip(rows, texts):
        ids = tok([text], return_tensors="pt", add_special_tokens=False)["input_ids"]
        assert row["token_ids"] and row["token_ids"] == float64_greedy_mix(models, [0.5, 0.25], ids, 4), row


def test_generate_readable_output_labels_lam(capsys, model_dirs, tok):
    ref, aligned, _ = model_dirs["gpt2"]
    code, out, _ = run(capsys, "generate", "--ref", ref, "--aligned", aligned, "--lam", "2", "--prompt", "Hi",
                       "--max-new-tokens", "3", "--do-sample", "--seed", "1", "--top-k", "5")
    assert code == 0 and "[λ=2.0] Hi" in out
    # Greedy, the text under the label is the float64 oracle's continuation at λ=2.
    code, out, _ = run(capsys, "generate", "--ref", ref, "--aligned", aligned, "--lam", "2", "--prompt", "Hi",
                       "--max-new-tokens", "5")
    models = [AutoModelForCausalLM.from_pretrained(path).eval() for path in (ref, aligned)]
    expected = float64_greedy_mix(models, [2.0], tok(["Hi"], return_tensors="pt")["input_ids"], 5)
    text = tok.decode(expected, skip_special_tokens=True)
    assert code == 0 and text.strip() and "[λ=2.0] Hi" in out and text in out, (out, text)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lam", "nan"], "`--lam` must be a finite number; got 'nan'"),
        (["--lam", "0.5,0.5"], "has 2 weight(s) but there are 1 aligned models"),
        (["--lam", "abc"], "`--lam` must be a number; got 'abc'"),
    ],
)
def test_generate_bad_lam_names_the_value(capsys, model_dirs, argv, message):
    ref, aligned, _ = model_dirs["llama"]
    code, _, err = run(capsys, "generate", "--ref", ref, "--aligned", aligned, "--prompt", "Hi", *argv)
    assert code == 2 and message in err


def test_plain_model_and_conflicting_flags(capsys, model_dirs):
    ref, aligned, _ = model_dirs["llama"]
    code, out, _ = run(capsys, "generate", "--model", ref, "--prompt", "Hi", "--max-new-tokens", "3", "--json")
    assert code == 0 and json.loads(out)["lam"] is None
    code, _, err = run(capsys, "generate", "--model", ref, "--ref", ref, "--aligned", aligned, "--prompt", "Hi")
    assert code == 2 and "Can't provide both `--ref` and `--model`" in err


def test_console_script_runs(model_dirs):
    ref, aligned, _ = model_dirs["llama"]
    exe = os.path.join(os.path.dirname(sys.executable), "aligndial")
    proc = subprocess.run(
        [exe, "generate", "--ref", ref, "--aligned", aligned, "--lam", "0.5", "--prompt", "Hi", "--max-new-tokens", "3", "--json"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["lam"] == 0.5


def test_interpolate_endpoints_are_exact(capsys, tmp_path, model_dirs):
    ref, aligned, _ = model_dirs["llama"]
    ref_w = load_file(os.path.join(ref, "model.safetensors"))
    aligned_w = load_file(os.path.join(aligned, "model.safetensors"))
    for lam, expected in ((0.0, ref_w), (1.0, aligned_w)):
        out = tmp_path / f"lam{lam}"
        code, stdout, _ = run(capsys, "interpolate", "--ref", ref, "--aligned", aligned, "--lam", str(lam), "--out", str(out), "--json")
        assert code == 0 and json.loads(stdout)["out"] == str(out)
        got = load_file(out / "model.safetensors")
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got)
    out = tmp_path / "half"
    assert run(capsys, "interpolate", "--ref", ref, "--aligned", aligned, "--lam", "0.5", "--out", str(out))[0] == 0
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers loads it
    k = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(model.state_dict()[k], (ref_w[k] + aligned_w[k]) / 2)


def test_adapter_init_merge_and_generate(capsys, tmp_path, model_dirs, tok):
    base = model_dirs["llama"][0]
    adapter = tmp_path / "adapter"
    code, out, _ = run(capsys, "adapter", "init", "--model", base, "--out", str(adapter), "--json")
    assert code == 0 and json.loads(out)["init"] == "identity"
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
    merged = tmp_path / "merged"
    code, out, _ = run(capsys, "adapter", "merge", "--model", base, "--adapter", str(adapter), "--out", str(merged), "--json")
    assert code == 0 and json.loads(out)["num_hidden_layers"] == 3
    assert AutoModelForCausalLM.from_pretrained(merged).config.num_hidden_layers == 3
    # An identity adapter: every λ gives the base model's tokens; plain `--model` is the comparison.
    code, out, _ = run(capsys, "generate", "--model", base, "--adapter", str(adapter), "--lam", "0", "--lam", "2",
                       "--prompt", "Hello", "--max-new-tokens", "5", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    code, plain_out, _ = run(capsys, "generate", "--model", base, "--prompt", "Hello", "--max-new-tokens", "5", "--json")
    assert code == 0 and [r["lam"] for r in rows] == [0.0, 2.0]
    assert rows[0]["token_ids"] == rows[1]["token_ids"] == json.loads(plain_out)["token_ids"]
    # An fp32 adapter serves on a bf16 load of the same base.
    code, out, _ = run(capsys, "generate", "--model", base, "--adapter", str(adapter), "--lam", "0.5", "--dtype", "bfloat16",
                       "--prompt", "Hello", "--max-new-tokens", "3", "--json")
    assert code == 0 and json.loads(out)["lam"] == 0.5


def test_adapter_on_wrong_base_is_a_clear_error(capsys, tmp_path, model_dirs):
    adapter = tmp_path / "adapter"
    assert run(capsys, "adapter", "init", "--model", model_dirs["llama"][0], "--out", str(adapter))[0] == 0
    code, _, err = run(capsys, "generate", "--model", model_dirs["qwen2"][0], "--adapter", str(adapter), "--prompt", "Hi")
    assert code == 2 and "architecture 'llama'" in err


def test_custom_code_needs_trust_remote_code(capsys, tmp_path, model_dirs):
    """Case 20: a checkpoint that needs custom code fails at once with a clear error (no prompt
    on stdin), and its code never runs."""
    import shutil

    path = tmp_path / "custom"
    shutil.copytree(model_dirs["llama"][0], path)
    marker = tmp_path / "code-ran"
    (path / "configuration_custom.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import LlamaConfig\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom-llama'\n"
    )
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    config["model_type"] = "custom-llama"  # unknown to transformers: only the custom code can load it
    (path / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "generate", "--model", str(path), "--prompt", "Hi", "--max-new-tokens", "2")
    assert code == 2 and "--trust-remote-code" in err
    assert not marker.exists()


@pytest.fixture
def count_loads(monkeypatch):
    """How many models were loaded: a spy on transformers' own from_pretrained (the real one runs)."""
    from transformers import AutoModelForCausalLM as Auto

    calls = []
    real = Auto.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(args[0] if args else kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(Auto, "from_pretrained", classmethod(spy))
    return calls


def _bad_argv(tmp_path, model_dirs):
    """(argv, message) pairs: each argv has one mistake and otherwise loadable models."""
    ref, aligned, aligned2 = model_dirs["llama"]
    messages = tmp_path / "messages.jsonl"
    messages.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    conv = tmp_path / "conv-prefs.jsonl"
    conv.write_text(json.dumps({"prompt": [{"role": "user", "content": "Hi"}],
                                "chosen": [{"role": "assistant", "content": "Hello"}],
                                "rejected": [{"role": "assistant", "content": "Go"}]}) + "\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi"}) + "\n")
    missing = str(tmp_path / "missing.jsonl")
    pair = ["--ref", ref, "--aligned", aligned]
    sweep = ["sweep", *pair, "--lams", "0,1", "--out", str(tmp_path / "sweep")]
    return [
        (["generate", *pair, "--prompt", "Hi", "--lam", "nan"], "`--lam` must be a finite number; got 'nan'"),
        (["generate", *pair, "--prompt", "Hi", "--lam", "0.5,0.5"], "has 2 weight(s) but there are 1 aligned models"),
        (["generate", *pair, "--prompts-file", str(messages)], "needs `--chat`"),
        (["generate", *pair, "--prompts-file", missing], "`--prompts-file " + missing + "`: no such file"),
        (["generate", *pair, "--aligned", aligned2, "--lam", "1,1", "--prompt", "Hi", "--think-lam", "0"],
         "`--think-lam` needs a mix"),
        (["generate", "--model", ref, "--adapter", str(tmp_path / "no-adapter"), "--prompt", "Hi"], "no such directory"),
        (["generate", *pair, "--prompt", "Hi", "--max-new-tokens", "0"], "must be ≥ 1"),
        ([*sweep, "--prompts", str(messages)], "needs `--chat`"),
        ([*sweep, "--prompts", missing], "`--prompts " + missing + "`: no such file"),
        ([*sweep, "--prompts", str(prompts), "--metric", "reward:no_such_module_xyz:f"], "cannot import module"),
        ([*sweep, "--metric", f"pairwise-accuracy:{conv}"], "add `--chat`"),
        ([*sweep, "--prompts", str(prompts), "--metric", "accuracy:("], "not a valid regular expression"),
        (["serve", *pair, "--default-lam", "nan"], "`--default-lam` must be a finite number"),
        (["export-vllm", *pair, "--default-lam", "inf", "--out", str(tmp_path / "e")], "must be a finite number"),
        (["train", "dpo", "--model", ref, "--data", missing, "--out", str(tmp_path / "t")], "no such file"),
        (["adapter", "merge", "--model", ref, "--adapter", str(tmp_path / "none"), "--out", str(tmp_path / "m")],
         "no such directory"),
        (["adapter", "init", "--model", ref, "--num-layers", "0", "--out", str(tmp_path / "a")], "must be ≥ 1"),
        (["interpolate", "--ref", ref, "--aligned", aligned, "--lam", "nan", "--out", str(tmp_path / "i")],
         "`--lam` must be a finite number"),
    ]


def test_every_argument_error_comes_before_any_model_loads(capsys, tmp_path, model_dirs, count_loads):
    for argv, message in _bad_argv(tmp_path, model_dirs):
        code, _, err = run(capsys, *argv)
        assert code == 2 and message in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, (argv, err)  # one line
        assert count_loads == [], f"{argv}: a model loaded before the error ({message})"
    # The spy sees loads: a correct command loads its two models.
    ref, aligned, _ = model_dirs["llama"]
    assert run(capsys, "generate", "--ref", ref, "--aligned", aligned, "--prompt", "Hi", "--max-new-tokens", "1")[0] == 0
    assert len(count_loads) == 2


def test_a_missing_local_model_directory_is_named(capsys, tmp_path, count_loads):
    code, _, err = run(capsys, "generate", "--ref", str(tmp_path / "sft-model"), "--aligned", "./dpo-model/",
                       "--prompt", "Hi")
    assert code == 2 and f"`--ref {tmp_path / 'sft-model'}`: no such directory" in err and count_loads == []


def test_a_missing_path_under_an_existing_directory_is_a_missing_directory(capsys, tmp_path, monkeypatch, model_dirs,
                                                                          count_loads):
    """`runs/student` where `runs/` exists can only be a local path: "no such directory", never a hub
    error, for every model flag (the distill teacher's too); `org/name` with no local `org/` stays a hub id."""
    from aligndial.cliargs import looks_local

    ref, aligned, _ = model_dirs["llama"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                                {"role": "assistant", "content": "Yo"}]}) + "\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "Hi"}) + "\n")
    for argv, flag in ((["generate", "--ref", ref, "--aligned", "runs/student", "--prompt", "Hi"], "--aligned"),
                       (["serve", "--model", "runs/student"], "--model"),
                       (["sweep", "--ref", "runs/student", "--aligned", aligned, "--lams", "0", "--prompts", "p.jsonl",
                         "--out", "s"], "--ref"),
                       (["train", "distill", "--ref", ref, "--aligned", "runs/student", "--data", "d.jsonl", "--out", "o"],
                        "--aligned"),
                       (["train", "sft", "--model", "runs/student", "--data", "d.jsonl", "--out", "o"], "--model")):
        code, _, err = run(capsys, *argv)
        assert code == 2 and f"`{flag} runs/student`: no such directory" in err, (argv, err)
        assert count_loads == [], argv
    assert not looks_local("Qwen/Qwen3-0.6B") and looks_local("runs/student")


def test_training_into_an_existing_out_refuses_unless_overwrite_or_resume(capsys, tmp_path, model_dirs, count_loads):
    ref = model_dirs["llama"][0]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Hi {i}", "completion": " there"}) + "\n" for i in range(4)))
    out = tmp_path / "earlier-run"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"an earlier run's weights")
    train = ["train", "sft", "--model", ref, "--data", str(data), "--out", str(out), "--max_steps", "1"]
    code, _, err = run(capsys, *train)
    assert code == 2 and f"`--out {out}` already holds files" in err and "--overwrite" in err, err
    assert count_loads == [] and (out / "adapter_model.safetensors").read_bytes() == b"an earlier run's weights"
    code, _, err = run(capsys, *train, "--resume")  # --resume applies: its own check speaks
    assert code == 2 and "no complete checkpoint" in err, err
    code, _, err = run(capsys, *train, "--overwrite", "--per_device_train_batch_size", "2")
    assert code == 0, err
    assert (out / "adapter_model.safetensors").read_bytes() != b"an earlier run's weights"


def test_an_empty_api_key_is_an_error_and_an_empty_env_key_warns(capsys, caplog, monkeypatch, model_dirs, count_loads):
    """`--api-key "$KEY"` with KEY unset must not start an open server; an empty ALIGNDIAL_API_KEY
    serves without a key and says so, on loopback too."""
    from aligndial.cli import make_parser
    from aligndial.serve import settings_from_args

    ref = model_dirs["llama"][0]
    for key in ("", "  "):
        code, _, err = run(capsys, "serve", "--model", ref, "--api-key", key)
        assert code == 2 and "`--api-key" in err and "is empty" in err and len(err.strip().splitlines()) == 1, err
    assert count_loads == []
    monkeypatch.setenv("ALIGNDIAL_API_KEY", "")
    with caplog.at_level("WARNING", logger="aligndial.serve"):
        settings = settings_from_args(make_parser().parse_args(["serve", "--model", ref]))
    assert settings.api_key is None and settings.host == "127.0.0.1"
    assert any("ALIGNDIAL_API_KEY is set but empty" in r.getMessage() for r in caplog.records), caplog.text


def test_a_plain_model_server_logs_that_it_takes_no_lam(model_dirs):
    """A plain `--model` server logged "λ default None, range [-5.0, 10.0]": it refuses λ, and says so."""
    from aligndial.cli import make_parser
    from aligndial.serve import settings_from_args, startup_line

    ref, aligned, _ = model_dirs["llama"]
    parse = make_parser().parse_args
    plain = startup_line(settings_from_args(parse(["serve", "--model", ref])), 128)
    assert "None" not in plain and "range" not in plain and "requests that set λ are refused" in plain, plain
    mixed = startup_line(settings_from_args(parse(["serve", "--ref", ref, "--aligned", aligned, "--api-key", "k"])), 128)
    assert "λ default 1.0, range [-5.0, 10.0], context 128 tokens, API key required" in mixed, mixed


def test_adapter_init_message_uses_an_before_a_vowel(capsys, tmp_path, model_dirs):
    code, out, _ = run(capsys, "adapter", "init", "--model", model_dirs["llama"][0], "--out", str(tmp_path / "a"))
    assert code == 0 and out.startswith("wrote an identity 1-layer adapter"), out
    code, out, _ = run(capsys, "adapter", "init", "--model", model_dirs["llama"][0], "--out", str(tmp_path / "b"),
                       "--init", "copy")
    assert code == 0 and out.startswith("wrote a copy 1-layer adapter"), out


def test_a_peft_lora_directory_as_adapter_says_what_it_is(capsys, tmp_path, model_dirs):
    from peft import LoraConfig, get_peft_model

    base = model_dirs["llama"][0]
    lora = tmp_path / "lora"
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(lora)
    capsys.readouterr()
    code, _, err = run(capsys, "generate", "--model", base, "--adapter", str(lora), "--prompt", "Hi")
    assert code == 2
    assert err.strip().splitlines() == [
        f"aligndial generate: error: `--adapter {lora}` is a PEFT LORA adapter, not an aligndial layer adapter; "
        f"pass it as `--ref {base} --aligned {lora}` (the base model with the adapter as the aligned model)"]


def _vllm_server_args(command: str):
    """The command's arguments as vLLM's own OpenAI server parses them."""
    import shlex

    from vllm.entrypoints.launchers.cli_args import make_arg_parser  # what `-m vllm.entrypoints.openai.api_server` parses with
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"], command
    return make_arg_parser(FlexibleArgumentParser()).parse_args(argv[3:])


@pytest.mark.slow  # vLLM: `make test-fast` leaves it out
def test_vllm_exports_print_a_serve_command_that_loads_the_export(capsys, tmp_path, model_dirs):
    ref, aligned, _ = model_dirs["llama"]
    adapter = tmp_path / "adapter"
    assert run(capsys, "adapter", "init", "--model", ref, "--out", str(adapter))[0] == 0
    for argv, out in (
        (["adapter", "merge", "--model", ref, "--adapter", str(adapter), "--for-vllm"], tmp_path / "m-vllm"),
        (["export-vllm", "--ref", ref, "--aligned", aligned], tmp_path / "pair-vllm"),
    ):
        code, stdout, _ = run(capsys, *argv, "--out", str(out))
        assert code == 0 and "vllm serve" not in stdout, stdout
        command = stdout.split("serve it with `")[1].rstrip().rstrip("`")
        parsed = _vllm_server_args(command)
        assert parsed.model == str(out) and parsed.dtype == "float32"


@pytest.mark.slow  # vLLM: `make test-fast` leaves it out
def test_enforce_eager_starts_vllm_without_compiling(capsys, tmp_path):
    """`--enforce-eager` reaches vLLM's engine (its log lists it and says compilation is off), the
    rows are the HF engine's greedy tokens, and the hf engine refuses the flag in one line."""
    from aligndial.demo.build import BUNDLE

    ref, adapter = str(BUNDLE / "ref"), str(BUNDLE / "adapter")
    argv = ["generate", "--model", ref, "--adapter", adapter, "--lam", "0.5", "--prompt", "Tom has 3 pens.",
            "--max-new-tokens", "8", "--json"]
    proc = subprocess.run([sys.executable, "-m", "aligndial.cli", *argv, "--engine", "vllm", "--enforce-eager"],
                          capture_output=True, text=True, timeout=900,
                          # A fresh environment: importing TRL earlier in this process (the training
                          # tests) sets VLLM_LOGGING_LEVEL=ERROR, which silenced the log this test reads.
                          env={**{k: os.environ[k] for k in ("PATH", "HOME", "PYTHONPATH") if k in os.environ},
                               "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "INFO"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "'enforce_eager': True" in proc.stderr and "disabling torch.compile" in proc.stderr
    code, out, _ = run(capsys, *argv)
    assert code == 0 and json.loads(proc.stdout)["token_ids"] == json.loads(out)["token_ids"]
    code, _, err = run(capsys, *argv, "--enforce-eager")
    assert code == 2 and "`--enforce-eager` applies to `--engine vllm`" in err


def test_served_model_id_is_the_directory_name_or_served_model_name(tmp_path):
    """Clients send the model's name, not the server's local paths joined by `+`."""
    from aligndial.cli import make_parser, served_model_name

    (tmp_path / "sft-model").mkdir()
    (tmp_path / "dpo-model").mkdir()
    (tmp_path / "helpful").mkdir()
    parse = make_parser().parse_args
    assert served_model_name(parse(["serve", "--model", f"{tmp_path}/sft-model/"])) == "sft-model"
    assert served_model_name(parse(["serve", "--ref", str(tmp_path / "sft-model"), "--aligned", str(tmp_path / "dpo-model"),
                                    "--aligned", str(tmp_path / "helpful")])) == "dpo-model+helpful"
    assert served_model_name(parse(["serve", "--model", "Qwen/Qwen2.5-0.5B-Instruct"])) == "Qwen/Qwen2.5-0.5B-Instruct"
    assert served_model_name(parse(["serve", "--model", str(tmp_path / "sft-model"), "--served-model-name", "mine"])) == "mine"
