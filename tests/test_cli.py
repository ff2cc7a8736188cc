"""`aligndial generate` and `aligndial interpolate`, end to end."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from aligndial.cli import main


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
    # λ=0 rows are the reference model's greedy tokens (plain transformers is the oracle).
    enc = tok(["Hello"], return_tensors="pt")
    expected = AutoModelForCausalLM.from_pretrained(ref).generate(**enc, max_new_tokens=6, do_sample=False)
    assert rows[0]["token_ids"] == expected[0, enc["input_ids"].shape[1] :].tolist()[: len(rows[0]["token_ids"])]


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


def test_generate_readable_output_labels_lam(capsys, model_dirs):
    ref, aligned, _ = model_dirs["gpt2"]
    code, out, _ = run(capsys, "generate", "--ref", ref, "--aligned", aligned, "--lam", "2", "--prompt", "Hi",
                       "--max-new-tokens", "3", "--do-sample", "--seed", "1", "--top-k", "5")
    assert code == 0 and "[λ=2.0] Hi" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lam", "nan"], "`--lam` must be finite; got 'nan'"),
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
