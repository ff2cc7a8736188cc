"""The LoRA pair (one base model, (K+1)·B rows per step) against the full pair built by merging
each adapter into a second model (PEFT's merge_and_unload): greedy tokens equal and mixed
log-probs within 1e-5 in fp32. λ=0 is the plain base and λ=1 PEFT's own adapted forward, bit
for bit. Then every place a pair works: beams, K=2, the CLI, the server, the distill teacher,
lm-eval; and weak-to-strong steering (K=2 full models at (λ, −λ)) against float64."""

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from aligndial.cli import main
from aligndial.lora_pair import LoraPair, LoraPairCache
from aligndial.mixed import load_pair
from aligndial.peft_dirs import is_lora_dir
from aligndial.pair import RealignedPair
from aligndial.tiny import EOS_ID, build_model, build_tokenizer, save
from reference import HEAD_SIDE, head_side_config

LAMS = [-1.0, 0.0, 0.5, 1.0, 2.0]
TOL = 1e-5


def plain(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def make_lora(base_dir, out, seed, targets="all-linear", scale=0.1, **config):
    """A trained-looking LoRA (random B, not PEFT's zero init, scaled so the adapted model stays
    a moderate change of the base, as a DPO adapter is) saved as a PEFT directory. `config`: more
    LoraConfig fields (e.g. lora_bias=True)."""
    torch.manual_seed(seed)
    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **config)
    model = get_peft_model(plain(base_dir), lora_config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(scale)
    model.save_pretrained(out)
    return str(out)


def merged(base_dir, lora_dir, untie=False):
    """The adapter merged into a second full model. `untie`: give the head its own copy of the
    tied embedding first, so merging a LoRA on the head does not also change the embeddings."""
    model = plain(base_dir)
    if untie:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    return PeftModel.from_pretrained(model, lora_dir).merge_and_unload().eval()


def full_pair(base_dir, lora_dirs, tok, untie=False):
    return RealignedPair(plain(base_dir), [merged(base_dir, d, untie) for d in lora_dirs], tok).eval()


def masked_logps(model, enc, lam):
    with torch.no_grad():
        logps = torch.log_softmax(model(**enc, lam=lam).logits.float(), -1)
    return logps[enc["attention_mask"].bool()]


def assert_close_logps(got, expected, what=""):
    """Within 1e-5, absolute for log-probs near 0 and relative for large negative ones (a
    log-prob of −150 carries float32 rounding of ~1e-5 whichever way it is computed: mixing hidden
    states before the head here, logits after two heads in the full pair)."""
    err = ((got - expected).abs() / expected.abs().clamp(min=1.0)).max().item()
    assert err <= TOL, f"{what}: mixed log-probs differ by {err:.3g} (relative; largest |logp| {expected.abs().max():.1f})"


def until_eos(ids: list[int], eos=(EOS_ID,)) -> list[int]:
    """Generated ids up to and including the first EOS, as `aligndial generate` reports a row."""
    return ids[: next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))]


def assert_equals_full_pair(lora, full, enc, lams, new_tokens=10, **gen):
    for lam in lams:
        assert_close_logps(masked_logps(lora, enc, lam), masked_logps(full, enc, lam), f"λ={lam}")
        kw = dict(max_new_tokens=new_tokens, do_sample=False, **gen)
        got, expected = lora.generate(**enc, lam=lam, **kw), full.generate(**enc, lam=lam, **kw)
        assert torch.equal(got, expected), f"λ={lam}: greedy tokens differ"


@pytest.fixture(scope="module")
def llama_lora(model_dirs, tmp_path_factory):
    """(base dir, [two LoRA dirs]) on the tiny Llama."""
    base = model_dirs["llama"][0]
    root = tmp_path_factory.mktemp("lora")
    return base, [make_lora(base, root / "a", seed=1), make_lora(base, root / "b", seed=2)]


@pytest.fixture(scope="module")
def qwen3_lora(replicas, tmp_path_factory):
    """(base dir, LoRA on every linear, LoRA on every linear and the tied head) on the Qwen3 replica."""
    base = replicas.qwen3("base", dtype="float32")
    root = tmp_path_factory.mktemp("qwen3-lora")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    return base, make_lora(base, root / "linear", seed=3), make_lora(base, root / "head", seed=4, targets=targets)


def test_load_pair_gives_one_base_model_with_the_adapter(llama_lora, tok):
    base, (a, _) = llama_lora
    assert is_lora_dir(a) and not is_lora_dir(base)
    pair = load_pair(base, a)
    assert isinstance(pair, LoraPair) and pair.n_aligned == 1
    n_base = sum(p.numel() for p in plain(base).parameters())
    n_pair = sum(p.numel() for p in pair.parameters())
    assert n_base < n_pair < 1.2 * n_base  # one model plus the low-rank factors, not two models


def test_realigned_pair_from_pretrained_returns_a_realigned_pair_only(llama_lora):
    """`RealignedPair.from_pretrained` returns the type it names: LoRA directories go to `load_pair`,
    which says it returns either. Before: it returned a LoraPair, not a subclass."""
    base, (a, _) = llama_lora
    with pytest.raises(ValueError, match="load_pair"):
        RealignedPair.from_pretrained(base, a)


def test_lora_changes_the_model(llama_lora, tok, prompts):
    """The equality above is not vacuous: the adapter moves the greedy tokens."""
    base, (a, _) = llama_lora
    pair = LoraPair.from_pretrained(base, a)
    enc = tok(prompts, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=10, do_sample=False)
    assert not torch.equal(pair.generate(**enc, lam=0.0, **kw), pair.generate(**enc, lam=1.0, **kw))


def test_lam_zero_is_the_plain_base_and_lam_one_peft_bit_for_bit(llama_lora, tok, prompts):
    base, (a, _) = llama_lora
    pair = LoraPair.from_pretrained(base, a)
    peft_model = PeftModel.from_pretrained(plain(base), a).eval()
    enc = tok(prompts, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=10, do_sample=False)
    with torch.no_grad():
        assert torch.equal(pair(**enc, lam=0.0).logits, plain(base)(**enc).logits)
        assert torch.equal(pair(**enc, lam=1.0).logits, peft_model(**enc).logits)
    assert torch.equal(pair.generate(**enc, lam=0.0, **kw), plain(base).generate(**enc, **kw))
    assert torch.equal(pair.generate(**enc, lam=1.0, **kw), peft_model.generate(**enc, **kw))


def test_beams_and_per_row_lam(llama_lora, tok, prompts):
    base, (a, _) = llama_lora
    lora, full = LoraPair.from_pretrained(base, a), full_pair(base, [a], tok)
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert_equals_full_pair(lora, full, enc, [0.5, torch.tensor([0.0, 0.7, 2.0])], num_beams=3)


def test_two_adapters_run_as_three_row_blocks(llama_lora, tok, prompts):
    base, loras = llama_lora
    lora, full = LoraPair.from_pretrained(base, loras), full_pair(base, loras, tok)
    enc = tok(prompts, return_tensors="pt", padding=True)
    cache = lora.new_cache()
    with torch.no_grad():
        lora(**enc, lam=[0.5, 0.25], past_key_values=cache, use_cache=True)
    assert cache.sources == [0, 1, 2] and cache.layers[0].keys.shape[0] == 3 * len(prompts)
    # Both mixed, one alone, two without the reference (two blocks, mixed before the head), steering.
    assert_equals_full_pair(lora, full, enc, [[0.5, 0.25], [0.0, 1.0], [1.0, 0.0], [0.6, 0.4], [1.5, -1.5]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_routing_equals_peft_mixed_adapter_batches(llama_lora, tok, prompts, dtype):
    """Both routings compute one mixed step: ours (in fp32 the in-place low-rank kernel; in bf16,
    where PEFT keeps the adapter in fp32, PEFT's own casting operations per row block) and PEFT's
    mixed-adapter batches (`adapter_names` with "__base__")."""
    base, (a, _) = llama_lora
    rows, peft_rows = (LoraPair.from_pretrained(base, a, dtype=dtype, routing=r) for r in ("rows", "peft"))
    assert {m.lora_A["aligned0"].weight.dtype for m in rows.base.modules() if hasattr(m, "lora_A")} == {torch.float32}
    enc = tok(prompts, return_tensors="pt", padding=True)
    got, expected = masked_logps(rows, enc, 0.5), masked_logps(peft_rows, enc, 0.5)
    if dtype is torch.float32:
        assert_close_logps(got, expected, "fp32")
    else:  # one bf16 rounding apart: PEFT casts the low-rank term to bf16 before adding it, we after
        assert (got - expected).abs().max() < 0.1 and (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9
    assert not torch.equal(masked_logps(rows, enc, 0.0), got)  # the adapter rows moved the mix

def test_qwen3_lora_on_the_tied_head(qwen3_lora, prompts):
    """A LoRA on a tied head adapts the head only (the embeddings stay the base's): the head
    differs per row block, so logits are mixed after it. The oracle merges into an untied copy,
    since merging into the tied weight would change the embeddings too."""
    base, _, head = qwen3_lora
    lora = LoraPair.from_pretrained(base, head)
    assert not lora.mix_before_head
    enc = lora.tokenizer(prompts, return_tensors="pt", padding=True)
    assert_equals_full_pair(lora, full_pair(base, [head], lora.tokenizer, untie=True), enc, LAMS, new_tokens=8)


# --- issue 26: a step after the head, LoRA biases, adapters on different modules ------------------------


@pytest.fixture(scope="module", params=HEAD_SIDE)
def head_side_lora(request, tok, tmp_path_factory):
    """(kind, base dir, LoRA on every linear) for a model whose own code runs after its head."""
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    base = str(save(AutoModelForCausalLM.from_config(head_side_config(request.param, len(tok))).eval(), tok, root / "base"))
    return request.param, base, make_lora(base, root / "lora", seed=5)


def test_a_step_after_the_head_is_kept(head_side_lora, tok, prompts):
    """Issue 26: the hidden-state mix called the head itself, skipping what the model does after
    it. Before the fix, at λ=0.5: Cohere's logits 16× too sharp (its logit_scale 0.0625 skipped),
    max |Δ log p| 6.9 against the merged pair; Granite's `logits_scaling` skipped (6.2); and
    Gemma 3's soft-cap, kept in text_config, skipped as well."""
    kind, base, lora_dir = head_side_lora
    lora = load_pair(base, lora_dir)
    assert isinstance(lora, LoraPair)
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert_equals_full_pair(lora, full_pair(base, [lora_dir], tok), enc, LAMS, new_tokens=8)


@pytest.mark.parametrize("kind, affine", [("cohere", True), ("granite", True), ("gemma2", False)])
def test_hidden_mix_is_chosen_by_asking_the_model(kind, affine, tok, tmp_path):
    """Hidden states are mixed in front of the head only where the model's own steps after it are
    affine (a logit scale), which the pair finds by probing the model, not by config names; a
    soft-cap (tanh) is not, so the logits are mixed. The probe leaves the global RNG alone."""
    torch.manual_seed(0)
    base = str(save(AutoModelForCausalLM.from_config(head_side_config(kind, len(tok))).eval(), tok, tmp_path / "base"))
    lora = LoraPair.from_pretrained(base, make_lora(base, tmp_path / "lora", seed=5))
    state = torch.get_rng_state()
    assert lora.mix_before_head is affine
    assert torch.equal(torch.get_rng_state(), state)


def test_lora_bias_is_added_on_mixed_steps(model_dirs, tok, prompts, tmp_path):
    """Issue 26: `LoraConfig(lora_bias=True)` gives lora_B a bias, which the in-place low-rank add
    of a mixed step dropped (λ=0 and λ=1 run PEFT's own operations and were right). Before the
    fix: max |Δ log p| 0.42 at λ=0.5 against the merged pair. Qwen2's q/k/v have a bias, so PEFT
    can merge the LoRA's into it for the oracle."""
    base = model_dirs["qwen2"][0]
    biased = make_lora(base, tmp_path / "bias", seed=6, targets=["q_proj", "k_proj", "v_proj"], lora_bias=True)
    lora = LoraPair.from_pretrained(base, biased)
    assert any(m.lora_B["aligned0"].bias is not None for m in lora.base.modules() if hasattr(m, "lora_B"))
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert_equals_full_pair(lora, full_pair(base, [biased], tok), enc, LAMS)


@pytest.fixture(scope="module")
def different_modules(llama_lora, tmp_path_factory):
    """(base, LoRA on every linear, LoRA on q_proj and v_proj only)."""
    base, (every, _) = llama_lora
    return base, every, make_lora(base, tmp_path_factory.mktemp("qv") / "qv", seed=7, targets=["q_proj", "v_proj"])


def test_adapters_on_different_modules(different_modules, tok, prompts):
    """Issue 26: a layer an adapter does not cover is that adapter's base there, as in PEFT.
    Before the fix: `KeyError: 'aligned1'` at λ=(0.5, 0.5) and at λ=(0, 1), in either order."""
    base, every, qv = different_modules
    enc = tok(prompts, return_tensors="pt", padding=True)
    lams = [[0.5, 0.5], [0.0, 1.0], [1.0, 0.0], [0.6, 0.4], [1.5, -1.5], [0.0, 0.0]]
    for order in ([every, qv], [qv, every]):
        assert_equals_full_pair(LoraPair.from_pretrained(base, order), full_pair(base, order, tok), enc, lams)


def test_cli_adapters_on_different_modules(different_modules, tok, capsys):
    """The same through `aligndial generate --aligned A --aligned B`, as the issue reproduced it."""
    base, every, qv = different_modules
    code = main(["generate", "--ref", base, "--aligned", every, "--aligned", qv, "--lam", "0.5,0.5", "--lam", "0,1",
                 "--prompt", "The quick brown fox", "--max-new-tokens", "8", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["lam"] for r in rows] == [[0.5, 0.5], [0.0, 1.0]]
    full = full_pair(base, [every, qv], tok)
    enc = tok(["The quick brown fox"], return_tensors="pt")
    for row in rows:
        expected = full.generate(**enc, lam=row["lam"], max_new_tokens=8, do_sample=False)[0, enc["input_ids"].shape[1]:]
        assert row["token_ids"] and row["token_ids"] == until_eos(expected.tolist()), row


@pytest.mark.slow
def test_adapter_trained_by_train_dpo_lora_rank(model_dirs, tok, prompts, tmp_path, capsys):
    base = model_dirs["llama"][0]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}: is the fox quick?", "chosen": " Yes, step by step.",
                                        "rejected": " No."}) + "\n" for i in range(8)))
    out = tmp_path / "dpo-lora"
    code = main(["train", "dpo", "--model", base, "--data", str(data), "--out", str(out), "--lora-rank", "8",
                 "--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate", "0.05", "--json"])
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and (out / "adapter_model.safetensors").is_file()
    lora = load_pair(base, str(out))
    assert isinstance(lora, LoraPair)
    trained = [p for n, p in lora.named_parameters() if "lora_B" in n]
    assert trained and any(p.abs().max() > 0 for p in trained)  # B moved away from PEFT's zero init
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert_equals_full_pair(lora, full_pair(base, [str(out)], tok), enc, LAMS)


def test_cli_generate_with_a_lora_dir(llama_lora, tok, capsys):
    base, (a, _) = llama_lora
    code = main(["generate", "--ref", base, "--aligned", a, "--lam", "0.5", "--lam", "2", "--prompt", "Hello",
                 "--prompt", "The quick brown fox", "--max-new-tokens", "8", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["prompt"], r["lam"]) for r in rows] == [(p, lam) for p in ("Hello", "The quick brown fox") for lam in (0.5, 2.0)]
    full = full_pair(base, [a], tok)
    for row in rows:
        enc = tok([row["prompt"]], return_tensors="pt")
        expected = full.generate(**enc, lam=row["lam"], max_new_tokens=8, do_sample=False)[0, enc["input_ids"].shape[1]:]
        assert row["token_ids"] and row["token_ids"] == until_eos(expected.tolist()), row


def test_cli_refuses_what_it_cannot_mix(llama_lora, tmp_path, capsys):
    base, (a, _) = llama_lora
    code = main(["generate", "--ref", base, "--aligned", a, "--aligned", base, "--prompt", "Hi", "--lam", "0.5,0.5"])
    assert code == 2 and "mixes LoRA adapter directories and full models" in capsys.readouterr().err
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "base_model_name_or_path": base}))
    with pytest.raises(ValueError, match="PEFT IA3 adapter; only LoRA"):
        LoraPair.from_pretrained(base, str(ia3))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": base}))
    with pytest.raises(OSError, match="no adapter_model.safetensors"):
        LoraPair.from_pretrained(base, str(pickled))
    for argv in (["generate", "--engine", "vllm"], ["serve", "--engine", "vllm"]):
        code = main([*argv, "--ref", base, "--aligned", a, *(["--prompt", "Hi"] if argv[0] == "generate" else [])])
        assert code == 2 and "runs only on the transformers engine" in capsys.readouterr().err
    # export-vllm has no --engine flag: its refusal names what that command's user can do instead.
    code = main(["export-vllm", "--ref", base, "--aligned", a, "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert code == 2 and "--engine" not in err and "`aligndial serve --ref" in err, err


def test_sweep_with_a_lora_dir_equals_the_merged_full_pair(llama_lora, tmp_path, capsys):
    base, (a, _) = llama_lora
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Hello", "The quick brown fox")))
    merged_dir = tmp_path / "merged"
    merged(base, a).save_pretrained(merged_dir)
    build_tokenizer().save_pretrained(merged_dir)
    rows = {}
    for name, aligned in (("lora", a), ("full", str(merged_dir))):
        code = main(["sweep", "--ref", base, "--aligned", aligned, "--lams", "0,0.5,2", "--prompts", str(prompts),
                     "--metric", "kl", "--metric", "length", "--max-new-tokens", "5", "--out", str(tmp_path / name)])
        assert code == 0, capsys.readouterr().err
        rows[name] = [json.loads(line) for line in (tmp_path / name / "rows.jsonl").read_text().splitlines()]
    assert [r["token_ids"] if "token_ids" in r else r["text"] for r in rows["lora"]] == \
        [r["token_ids"] if "token_ids" in r else r["text"] for r in rows["full"]]
    for got, expected in zip(rows["lora"], rows["full"]):
        assert got["kl"] == pytest.approx(expected["kl"], rel=1e-4, abs=1e-5)


def test_server_one_prompt_at_two_lam(llama_lora, tok):
    from aligndial.serve import HFEngine
    from test_serve import NAME, Server

    base, (a, _) = llama_lora
    lora = load_pair(base, a)
    full = full_pair(base, [a], tok)
    enc = tok(["The quick brown fox"], return_tensors="pt")
    with Server(HFEngine(lora, lora.tokenizer, 1, max_concurrency=4, max_queue=4)) as server:
        client = server.client()

        def ask(lam):
            r = client.completions.create(model=NAME, prompt="The quick brown fox", max_tokens=10, temperature=0,
                                          extra_body={"alignment_strength": lam, "return_token_ids": True})
            return r.choices[0].model_extra["token_ids"]

        with ThreadPoolExecutor(2) as pool:  # concurrent: both λ share decode steps
            got = dict(zip((0.5, 2.0), pool.map(ask, (0.5, 2.0))))
    for lam, ids in got.items():
        expected = full.generate(**enc, lam=lam, max_new_tokens=10, do_sample=False)[0, enc["input_ids"].shape[1]:]
        assert ids and ids == until_eos(expected.tolist()), f"λ={lam}"
    assert got[0.5] != got[2.0]


def test_distill_teacher_is_the_lora_pair(llama_lora, tok, prompts):
    from aligndial.train.distill import MixedTeacher, teacher_pair

    base, (a, _) = llama_lora
    pair = teacher_pair(base, a, tok)
    assert isinstance(pair, LoraPair)
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        got = MixedTeacher(pair, 1.5)(**enc).logits
        expected = MixedTeacher(full_pair(base, [a], tok), 1.5)(**enc).logits
    mask = enc["attention_mask"].bool()
    assert_close_logps(torch.log_softmax(got, -1)[mask], torch.log_softmax(expected, -1)[mask], "teacher")


def test_lm_eval_model_type_takes_a_lora_dir(llama_lora, tok):
    from aligndial.lmeval import AligndialLM

    base, (a, _) = llama_lora
    lm = AligndialLM(ref=base, aligned=a, lam=0.5, batch_size=1, device="cpu")
    assert isinstance(lm.model, LoraPair)
    enc = tok(["The quick brown fox"], return_tensors="pt")
    with torch.no_grad():
        got = torch.log_softmax(lm._model_call(enc["input_ids"]), -1)
        expected = torch.log_softmax(full_pair(base, [a], tok)(**enc, lam=0.5).logits, -1)
    assert_close_logps(got[0], expected[0], "lm-eval")


def test_cache_rows_follow_the_sources(llama_lora, tok):
    base, (a, _) = llama_lora
    pair = LoraPair.from_pretrained(base, a)
    enc = tok(["Hello", "The quick"], return_tensors="pt", padding=True)
    for lam, sources in ((0.0, [0]), (1.0, [1]), (0.5, [0, 1])):
        cache = pair.new_cache()
        with torch.no_grad():
            pair(**enc, lam=lam, past_key_values=cache, use_cache=True)
        assert isinstance(cache, LoraPairCache) and cache.sources == sources
        assert cache.layers[0].keys.shape[0] == 2 * len(sources)
    with pytest.raises(ValueError, match="holds rows for sources"):
        pair(**enc, lam=0.5, past_key_values=cache_of(pair, enc, 0.0), use_cache=True)


def cache_of(pair, enc, lam):
    cache = pair.new_cache()
    with torch.no_grad():
        pair(**enc, lam=lam, past_key_values=cache, use_cache=True)
    return cache


# --- weak-to-strong steering (proxy-tuning / EFT) ------------------------------------------------------


@pytest.fixture(scope="module")
def steering_dirs(tok, tmp_path_factory):
    """A larger reference and a small (tuned, base) pair over one tokenizer."""
    root = tmp_path_factory.mktemp("steer")
    large = save(build_model("llama", tok, seed=10, hidden=128, layers=3), tok, root / "large")
    small_base = save(build_model("llama", tok, seed=11), tok, root / "small-base")
    small_tuned = save(build_model("llama", tok, seed=12), tok, root / "small-tuned")
    return str(large), str(small_tuned), str(small_base)


def float64_steered_greedy(large, tuned, small, ids, lam, steps):
    """h_large + λ·(h_tuned − h_base), recomputed without a cache and mixed in float64."""
    for _ in range(steps):
        with torch.no_grad():
            h = [m(ids).logits[:, -1].double() for m in (large, tuned, small)]
        ids = torch.cat([ids, (h[0] + lam * (h[1] - h[2])).argmax(-1, keepdim=True)], dim=-1)
    return ids


@pytest.mark.parametrize("lam", [0.5, 1.0, 2.0])
def test_steering_matches_float64(steering_dirs, tok, prompts, lam):
    large, tuned, small = steering_dirs
    pair = RealignedPair.from_pretrained(large, [tuned, small])
    models = [plain(d) for d in steering_dirs]
    for prompt in prompts:
        enc = tok([prompt], return_tensors="pt")
        got = pair.generate(**enc, lam=[lam, -lam], max_new_tokens=10, min_new_tokens=10, do_sample=False)
        assert torch.equal(got, float64_steered_greedy(*models, enc["input_ids"], lam, 10)), prompt


def test_steering_through_the_cli(steering_dirs, tok, capsys):
    large, tuned, small = steering_dirs
    code = main(["generate", "--ref", large, "--aligned", tuned, "--aligned", small, "--lam", "1,-1", "--lam", "0,0",
                 "--prompt", "Hello", "--max-new-tokens", "6", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    steered, unsteered = (json.loads(line) for line in out.splitlines())
    assert steered["lam"] == [1.0, -1.0] and unsteered["lam"] == [0.0, 0.0]
    enc = tok(["Hello"], return_tensors="pt")
    alone = plain(large).generate(**enc, max_new_tokens=6, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
    assert unsteered["token_ids"] and unsteered["token_ids"] == until_eos(alone)  # λ=(0, 0) is the large model alone
    models = [plain(d) for d in steering_dirs]
    expected = float64_steered_greedy(*models, enc["input_ids"], 1.0, 6)[0, enc["input_ids"].shape[1]:].tolist()
    assert steered["token_ids"] and steered["token_ids"] == until_eos(expected)


def test_steering_keeps_the_tokenizer_check(steering_dirs, tmp_path):
    large, tuned, _ = steering_dirs
    other_tok = build_tokenizer(["completely different text for another vocabulary " * 20], vocab_size=300)
    other = str(save(build_model("llama", other_tok, seed=13), other_tok, tmp_path / "other"))
    with pytest.raises(ValueError, match="tokenizers of"):
        RealignedPair.from_pretrained(large, [tuned, other])
    assert os.path.isdir(other)
