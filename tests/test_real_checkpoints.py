"""The DeRa pair on replicas of the checkpoints people load (tests/replicas.py): Qwen3 base and
instruct behind the real Qwen3 tokenizer (fp32 and bf16), Llama-3-like (no pad token, a chat
template that writes BOS), Gemma-like (add_bos_token, final logit soft-cap, left padding), and
heads padded to different widths over one tokenizer. Plain transformers is the oracle: λ=0 is the
reference alone, λ=1 the aligned model alone, each with its own generation_config (issue 17)."""

import json
import os
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from aligndial.cli import main
from aligndial.loading import load_causal_lm, load_tokenizer
from aligndial.pair import RealignedPair, check_tokenizers
from reference import float64_greedy
from replicas import CHAT_PROBE, QWEN3_ENDOFTEXT, QWEN3_IM_END, QWEN3_TOKENS

PROMPTS = ["What is 2 + 3? Answer briefly.", "Hi"]
MAX_NEW = 24


def plain(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()


def plain_tokenizer(path):
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token is None:  # Llama 3 ships none; batched generation needs one
        tok.pad_token = tok.eos_token
    return tok


def chat_batch(tok, prompts=PROMPTS):
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)  # the template wrote any BOS


def oracle_rows(path, enc, pad_id) -> list[list[int]]:
    """Plain transformers greedy on one model with its own generation_config: the generated ids
    of each row up to and including its first EOS (as `aligndial generate` reports them)."""
    model = plain(path)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=pad_id)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    rows = []
    for ids in out[:, enc["input_ids"].shape[1]:].tolist():
        rows.append(ids[: next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))])
    return rows


def cli_rows(capsys, *args) -> list[dict]:
    capsys.readouterr()
    code = main(["generate", *args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]


# ---- 1. base + instruct pairs are accepted, with a warning naming the special tokens ----

def test_base_and_instruct_tokenizers_warn_instead_of_refusing(replicas):
    """Case 36. Before the fix: `ValueError: special tokens of ... differ: eos_token: '<|endoftext|>'
    vs '<|im_end|>'` refused the most common (reference, aligned) pair there is."""
    base, instruct = replicas.qwen3("base", dtype="float32"), replicas.qwen3("instruct", dtype="float32")
    with pytest.warns(UserWarning, match=r"eos_token: '<\|endoftext\|>' vs '<\|im_end\|>'"):
        check_tokenizers(load_tokenizer(base), load_tokenizer(instruct), base, instruct)
    # Llama 3: EOS differs, and so does pad (no pad token: the loader stands EOS in for it)
    with pytest.warns(UserWarning, match=r"eos_token: '<\|end_of_text\|>' vs '<\|eot_id\|>'; pad_token"):
        check_tokenizers(load_tokenizer(replicas.llama3("base")), load_tokenizer(replicas.llama3("instruct")))


def test_different_vocabularies_are_still_refused_naming_tokens(replicas):
    qwen, llama = load_tokenizer(replicas.qwen3("base", dtype="float32")), load_tokenizer(replicas.llama3("base"))
    with pytest.raises(ValueError, match=r"tokenizers of ref and aligned differ: 151669 vs \d+ tokens; .* e\.g\. \[\("):
        check_tokenizers(qwen, llama)
    other = load_tokenizer(replicas.qwen3("base", dtype="float32"))
    other.unk_token = "<|im_start|>"  # an unk token changes what text becomes: still refused
    with pytest.raises(ValueError, match="unk_token"):
        check_tokenizers(qwen, other)


# ---- 2. the pair stops on its members' EOS: the CLI against plain transformers ----

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cli_chat_lam_one_is_the_instruct_model_and_lam_zero_the_base_model(replicas, capsys, dtype):
    """`aligndial generate --ref BASE --aligned INSTRUCT --chat --lam 1` equals the instruct model
    alone token for token (it stops at <|im_end|>), and `--lam 0` the base model alone.
    Before the fix: `aligndial generate: error: special tokens of ... differ: eos_token:
    '<|endoftext|>' vs '<|im_end|>'` (exit 2); with the check relaxed alone, λ=1 ran past <|im_end|>
    because the pair stopped on the reference's EOS only."""
    base, instruct = replicas.qwen3("base", dtype=dtype), replicas.qwen3("instruct", dtype=dtype)
    rows = cli_rows(capsys, "--ref", base, "--aligned", instruct, "--chat", "--lam", "1", "--lam", "0",
                    *sum((["--prompt", p] for p in PROMPTS), []), "--max-new-tokens", str(MAX_NEW))
    tok = plain_tokenizer(base)
    enc = chat_batch(tok)
    for lam, path in ((1.0, instruct), (0.0, base)):
        got = [r["token_ids"] for r in rows if r["lam"] == lam]
        assert got == oracle_rows(path, enc, tok.pad_token_id), f"λ={lam}"
    first_reply = [r["token_ids"] for r in rows if r["lam"] == 1.0][0]
    assert first_reply[-1] == QWEN3_IM_END and len(first_reply) < MAX_NEW  # the instruct reply really ended


def test_pair_stops_on_the_eos_of_the_members_it_runs(replicas):
    pair = RealignedPair.from_pretrained(replicas.qwen3("base", dtype="float32"), replicas.qwen3("instruct", dtype="float32"))
    assert pair.generation_config.eos_token_id == [QWEN3_ENDOFTEXT, QWEN3_IM_END]
    assert pair.eos_token_ids(0.0) == [QWEN3_ENDOFTEXT]
    assert pair.eos_token_ids(1.0) == [QWEN3_IM_END, QWEN3_ENDOFTEXT]
    assert pair.eos_token_ids(0.5) == [QWEN3_ENDOFTEXT, QWEN3_IM_END]
    assert pair.eos_token_ids(torch.tensor([0.0, 1.0]), 2) == [QWEN3_ENDOFTEXT, QWEN3_IM_END]
    assert pair.ref.generation_config.eos_token_id == QWEN3_ENDOFTEXT  # the member's own config is untouched


# ---- 8. every family: λ=0 is the reference's greedy tokens, λ=1 the aligned model's, λ=0.5 the float64 mix ----

FAMILIES = {
    "qwen3-fp32": lambda r: (r.qwen3("base", dtype="float32"), r.qwen3("instruct", dtype="float32")),
    "qwen3-bf16": lambda r: (r.qwen3("base"), r.qwen3("instruct")),
    "llama3": lambda r: (r.llama3("base"), r.llama3("instruct")),
    "gemma": lambda r: (r.gemma("base"), r.gemma("instruct")),
    # one tokenizer, heads padded to 151936 and 152064 rows (Qwen3-0.6B vs Qwen2.5-7B widths)
    "qwen3-padded-widths": lambda r: (r.qwen3("base", dtype="float32"),
                                      r.qwen3("instruct", dtype="float32", head_rows=152064)),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pair_on_replicas_equals_each_model_alone(replicas, family):
    ref, aligned = FAMILIES[family](replicas)
    pair = RealignedPair.from_pretrained(ref, aligned)
    tok = plain_tokenizer(ref)
    batches = [chat_batch(tok)]
    if family == "gemma":  # plain text too: the tokenizer adds BOS, rows are left-padded
        batches.append(tok(["The quick brown fox", "a"], return_tensors="pt", padding=True))
    kw = dict(max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.pad_token_id)
    for enc in batches:
        for lam, path in ((0.0, ref), (1.0, aligned)):
            with torch.no_grad():  # whole sequences: the same tokens, the same stops, the same padding after
                assert torch.equal(pair.generate(**enc, lam=lam, **kw), plain(path).generate(**enc, **kw)), f"{family} λ={lam}"
    if family == "qwen3-padded-widths":
        logits = pair(chat_batch(tok)["input_ids"], lam=0.5).logits
        assert logits.shape[-1] == 151936 and torch.isneginf(logits[..., QWEN3_TOKENS:]).all()
    # Mixed (issue 26): at λ=0.5 the log-probs over the tokenizer's ids are the float64 mix of the
    # plain models' logits, and (float32 replicas, where a cache changes no rounding that matters)
    # each reply is the float64 step-by-step oracle's, up to the EOS of either member.
    ref_model, aligned_model, n = plain(ref), plain(aligned), len(tok)
    for enc in batches:
        mask = enc["attention_mask"].bool()
        with torch.no_grad():
            got = torch.log_softmax(pair(**enc, lam=0.5).logits[..., :n].double(), -1)[mask]
            mix = 0.5 * ref_model(**enc).logits[..., :n].double() + 0.5 * aligned_model(**enc).logits[..., :n].double()
        expected = torch.log_softmax(mix, -1)[mask]
        err = ((got - expected).abs() / expected.abs().clamp(min=1.0)).max().item()
        assert err < 1e-4, f"{family} λ=0.5: log-probs differ from float64 by {err:.3g}"
    if family != "qwen3-bf16":
        for prompt in PROMPTS:
            one = chat_batch(tok, [prompt])
            with torch.no_grad():
                out = pair.generate(**one, lam=0.5, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.pad_token_id)
            got = out[0, one["input_ids"].shape[1]:].tolist()
            expected = float64_greedy(ref_model, aligned_model, one["input_ids"], 0.5, MAX_NEW,
                                      eos=set(pair.eos_token_ids(0.5)))[0].tolist()
            assert got and got == expected, f"{family} λ=0.5 {prompt!r}"


# ---- 3. members on other devices / offloaded by accelerate ----

OFFLOAD = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu", "model.norm": "cpu",
           "model.rotary_emb": "cpu", "lm_head": "cpu"}


def test_member_offloaded_by_accelerate_device_map(replicas):
    """One member placed by accelerate with a layer offloaded to disk (hooks move its weights in
    for each forward): the pair's logits and tokens are those of the pair in memory.
    Before the fix: `TypeError: RealignedPair.from_pretrained() got an unexpected keyword argument
    'device_map'` (loading had no device_map)."""
    ref, aligned = replicas.llama3("base"), replicas.llama3("instruct")
    placed = RealignedPair.from_pretrained(ref, aligned, device_map=[None, OFFLOAD])
    assert "disk" in placed.aligned[0].hf_device_map.values()
    in_memory = RealignedPair.from_pretrained(ref, aligned)
    tok = plain_tokenizer(ref)
    enc = chat_batch(tok)
    with torch.no_grad():
        for lam in (0.5, 1.0, 2.0):
            assert torch.equal(placed(**enc, lam=lam).logits, in_memory(**enc, lam=lam).logits), lam
        got = placed.generate(**enc, lam=1.0, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        want = plain(aligned).generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(got, want)


def test_cli_device_map_per_member(replicas, capsys):
    """`--device-map` once per member (reference first): the same rows as without it."""
    ref, aligned = replicas.llama3("base"), replicas.llama3("instruct")
    common = ["--ref", ref, "--aligned", aligned, "--chat", "--lam", "0.5", "--prompt", "Hi", "--max-new-tokens", "6"]
    placed = cli_rows(capsys, *common, "--device-map", "cpu", "--device-map", json.dumps(OFFLOAD))
    assert [r["token_ids"] for r in placed] == [r["token_ids"] for r in cli_rows(capsys, *common)]
    capsys.readouterr()
    assert main(["generate", *common, "--device-map", "cpu", "--device-map", "cpu", "--device-map", "cpu"]) == 2
    assert "`--device-map` was given 3 times for 2 model(s)" in capsys.readouterr().err


def test_members_on_different_devices_mix_on_the_references_device(replicas):
    """Each member gets its inputs on its own device, and the mix happens on the reference's
    output device. With no second real device here, the reference lives on the meta device
    (shapes only) and the aligned model on the CPU: its logits must travel to the reference's
    device, and the reference's inputs to it. Before the fix: the CPU inputs reached the meta
    model and `mix_logits` added tensors of two devices (`out.add_` across devices)."""
    ref_dir, aligned_dir = replicas.llama3("base"), replicas.llama3("instruct")
    config = AutoConfig.from_pretrained(ref_dir)
    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(config)
    pair = RealignedPair(ref, [plain(aligned_dir)], plain_tokenizer(ref_dir))
    assert pair.mix_device.type == "meta" and pair.device.type == "meta"
    ids = plain_tokenizer(ref_dir)(["Hello there"], return_tensors="pt")["input_ids"]
    for lam in (0.5, 1.0):
        logits = pair(ids, lam=lam).logits
        assert logits.device.type == "meta" and logits.shape == (1, ids.shape[1], len(pair.tokenizer))


# ---- 7. a truncated weights file is one line naming it ----

@pytest.fixture(scope="module")
def truncated(tmp_path_factory, replicas):
    src = replicas.llama3("base")
    out = tmp_path_factory.mktemp("truncated") / "model"
    shutil.copytree(src, out)
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return str(out), str(weights)


def test_truncated_weights_name_the_file(truncated):
    """Case 32. Before the fix: `safetensors_rust.SafetensorError: Error while deserializing header:
    incomplete metadata, file not fully covered`, a traceback without the file."""
    model_dir, weights = truncated
    with pytest.raises(OSError) as info:
        load_causal_lm(model_dir)
    message = str(info.value)
    assert weights in message and "truncated or corrupt" in message and "again" in message and "\n" not in message


@pytest.mark.parametrize("verb", ["generate", "serve", "adapter-init", "interpolate"])
def test_truncated_weights_are_one_line_in_every_verb(truncated, replicas, tmp_path, capsys, verb):
    """Case 32 through the CLI. Before the fix: a traceback ending in `SafetensorError: Error while
    deserializing header: incomplete metadata, file not fully covered`, the file not named."""
    model_dir, weights = truncated
    good = replicas.llama3("base", seed=2)  # same tokenizer: only the weights file can fail
    argv = {
        "generate": ["generate", "--ref", model_dir, "--aligned", good, "--prompt", "Hi"],
        "serve": ["serve", "--ref", model_dir, "--aligned", good, "--port", "0"],
        "adapter-init": ["adapter", "init", "--model", model_dir, "--out", str(tmp_path / "a")],
        "interpolate": ["interpolate", "--ref", good, "--aligned", model_dir, "--lam", "0.5", "--out", str(tmp_path / "i")],
    }[verb]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]  # not the good model's progress bar
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("aligndial ") and weights in lines[0] and "truncated or corrupt" in lines[0], err


# ---- 5. the sweep's KL on Qwen3 replicas, heads of equal and different widths ----

@pytest.mark.parametrize("padded", [False, True])
def test_sweep_kl_metric_on_qwen3_replicas(replicas, padded):
    """KL(π_λ ‖ π_ref) summed over a generated reply: 0 at λ=0, the float64 formula at λ=1 (over the
    real tokens when the heads' widths differ), finite. Before the fix, a pair of heads 151936 and
    152064 rows wide could not be scored without a full-size copy per term (mix over (T, V) twice)."""
    from aligndial.generation import generate_rows, render_prompts
    from aligndial.metrics import KL, Scoring

    base = replicas.qwen3("base", dtype="float32")
    instruct = replicas.qwen3("instruct", dtype="float32", head_rows=152064 if padded else 151936)
    pair = RealignedPair.from_pretrained(base, instruct)
    tok = pair.tokenizer
    texts = render_prompts(tok, [CHAT_PROBE], chat=True)
    rows = []
    for lam in (0.0, 1.0):
        for row in generate_rows(pair, tok, texts, lam=lam, add_special_tokens=False, max_new_tokens=6):
            rows.append({**row, "lam": lam, "context": texts[0], "prompt": CHAT_PROBE})
    kl = KL()(rows, Scoring(model=pair, tokenizer=tok, chat=True))
    assert kl[0] == 0.0
    ctx = tok(texts[0], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + rows[1]["token_ids"]])
    with torch.no_grad():
        h_ref, h_al = (plain(p)(ids).logits[0, len(ctx) - 1 : -1, :QWEN3_TOKENS].double() for p in (base, instruct))
    if not padded:
        with torch.no_grad():
            h_ref, h_al = (plain(p)(ids).logits[0, len(ctx) - 1 : -1].double() for p in (base, instruct))
    logp, logq = torch.log_softmax(h_al, -1), torch.log_softmax(h_ref, -1)
    expected = (logp.exp() * (logp - logq)).sum().item()
    assert kl[1] == pytest.approx(expected, rel=1e-4)


# ---- 6. dual_path_agreement tokenizes a rendered chat without a second BOS ----

def test_dual_path_agreement_has_one_bos_on_llama3(replicas):
    """The texts are rendered chat templates, which already start with BOS on Llama 3. Before the
    fix they were tokenized with special tokens on: two BOS, and the KL of another sequence."""
    from aligndial.adapter import insert_adapter
    from aligndial.dualpath import DualPathModel
    from aligndial.train.distill import dual_path_agreement

    ref_dir, aligned_dir = replicas.llama3("base"), replicas.llama3("instruct")
    tok = load_tokenizer(ref_dir)
    pair = RealignedPair.from_pretrained(ref_dir, aligned_dir)
    student = load_causal_lm(ref_dir)
    insert_adapter(student, num_layers=1, init="kaiming", seed=0, base_model=ref_dir)
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False) for p in PROMPTS]
    assert all(t.startswith(tok.bos_token) for t in texts)
    got = dual_path_agreement(student, pair, tok, texts, teacher_lam=1.5)
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert (enc["input_ids"] == tok.bos_token_id).sum(-1).tolist() == [1, 1]
    mask = enc["attention_mask"].bool()
    dual = DualPathModel(student).eval()
    with torch.no_grad():
        for mu in (0.5, 1.0, 1.5):
            p = torch.log_softmax(dual(**enc, lam=mu).logits.double(), -1)
            q = torch.log_softmax(pair(**enc, lam=mu * 1.5).logits.double(), -1)
            expected = (p.exp() * (p - q)).sum(-1)[mask].mean().item()
            assert got[str(mu)] == pytest.approx(expected, rel=1e-3, abs=1e-6), mu
