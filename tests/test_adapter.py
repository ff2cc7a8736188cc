"""Layer-adapter surgery on tiny random models of every supported architecture.

Oracle: the base model itself. An identity adapter must reproduce its logits and its cached greedy
tokens; a merged adapter must reload with plain transformers and reproduce the adapted model.
`tok` (the offline tokenizer) and HF_HUB_OFFLINE come from conftest.py.
"""

import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from aligndial import tiny
from aligndial.adapter import (
    ARCHITECTURES,
    AdapterConfig,
    LoRALinear,
    adapter_parameters,
    decoder_layers,
    fingerprint,
    freeze_base,
    insert_adapter,
    load_adapter,
    merge_adapter,
    save_adapter,
)

PROMPTS = ["Hello, how are", "The quick brown fox jumps over the"]


@pytest.fixture(scope="module")
def batch(tok):
    return tok(PROMPTS, return_tensors="pt", padding=True)  # left-padded, with attention_mask


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def greedy(model, batch):
    out = model.generate(**batch, do_sample=False, max_new_tokens=8)
    return out[:, batch["input_ids"].shape[1] :]


def layer_indices(model):
    return [m.layer_idx for m in model.modules() if "layer_idx" in vars(m)]


def test_architectures_match_tiny_models():
    assert set(ARCHITECTURES) == set(tiny.SUPPORTED_TINY)


def _tied(model) -> bool:
    return model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("arch", tiny.SUPPORTED_TINY)
def test_identity_adapter_is_exact(arch, tied, tok, batch):
    """Real small checkpoints tie the head to the input embedding (Qwen3 0.6B-4B, Llama 3.2,
    Gemma): every architecture is checked both ways."""
    model = tiny.build_model(arch, tok, tie_word_embeddings=tied)
    assert _tied(model) == tied
    base_layers = model.config.num_hidden_layers
    base_logits, base_tokens = logits(model, batch), greedy(model, batch)

    cfg = insert_adapter(model, num_layers=2 if arch == "llama" else 1)
    n = cfg.num_layers

    assert model.aligndial_adapter is cfg
    assert len(decoder_layers(model)) == model.config.num_hidden_layers == base_layers + n
    if getattr(model.config, "layer_types", None) is not None:
        assert len(model.config.layer_types) == base_layers + n
    # Every layer_idx holder (attention, and gemma3's decoder layer) numbered by its layer, in order.
    per_layer = [sorted(set(layer_indices(layer))) for layer in decoder_layers(model)]
    assert per_layer == [[i] for i in range(base_layers + n)]
    torch.testing.assert_close(logits(model, batch), base_logits, atol=1e-6, rtol=0)
    assert torch.equal(greedy(model, batch), base_tokens)


def test_copy_and_kaiming_change_outputs_kaiming_is_seeded(tok, batch):
    base = logits(tiny.build_model("llama", tok), batch)

    def adapted(init, seed=0):
        model = tiny.build_model("llama", tok)
        insert_adapter(model, init=init, seed=seed)
        return logits(model, batch)

    copy, kaiming = adapted("copy"), adapted("kaiming")
    assert not torch.allclose(copy, base, atol=1e-3)
    assert not torch.allclose(kaiming, base, atol=1e-3)
    assert torch.equal(adapted("kaiming"), kaiming)
    assert not torch.allclose(adapted("kaiming", seed=1), kaiming, atol=1e-3)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("arch", tiny.SUPPORTED_TINY)
def test_lora_identity_then_merge_roundtrip(arch, tied, tok, batch, tmp_path):
    """LoRA with B=0 is exact; after moving B, merge + save_pretrained + from_pretrained reproduces it.

    Folding B·A into the weight reassociates fp32 sums; through these random stacks that moves logits
    of size ~6 by up to ~4e-5 (measured on all 14), hence atol 1e-4 there. A wrong merge moves them
    by ~1-10. Saving and reloading the merged model must then change nothing at all.
    """
    model = tiny.build_model(arch, tok, tie_word_embeddings=tied)
    base_logits = logits(model, batch)
    cfg = insert_adapter(model, lora_rank=4)
    assert cfg.lora_alpha == 4.0
    assert any(isinstance(m, LoRALinear) for m in decoder_layers(model)[0].modules())
    torch.testing.assert_close(logits(model, batch), base_logits, atol=1e-6, rtol=0)

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in adapter_parameters(model):
            assert name.endswith((".lora_A", ".lora_B"))
            if name.endswith(".lora_B"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    adapted_logits, adapted_tokens = logits(model, batch), greedy(model, batch)
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-3)

    merged = merge_adapter(model)
    assert not hasattr(merged, "aligndial_adapter")
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    merged_logits = logits(merged, batch)
    torch.testing.assert_close(merged_logits, adapted_logits, atol=1e-4, rtol=0)

    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == len(decoder_layers(reloaded)) == 3
    assert _tied(reloaded) == tied
    assert torch.equal(logits(reloaded, batch), merged_logits)
    assert torch.equal(greedy(reloaded, batch), adapted_tokens)


def test_unsupported_architecture_is_named(tok):
    config = AutoConfig.for_model("gptj", vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, rotary_dim=8)
    model = AutoModelForCausalLM.from_config(config)
    for call in (insert_adapter, decoder_layers):
        with pytest.raises(ValueError, match=r"'gptj'.*llama, qwen2.*falcon"):
            call(model)


def test_refuses_second_adapter_and_post_ln_opt(tok):
    model = tiny.build_model("llama", tok)
    insert_adapter(model)
    with pytest.raises(ValueError, match="already has an aligndial adapter"):
        insert_adapter(model)
    opt = tiny.build_model("opt", tok, do_layer_norm_before=False)
    with pytest.raises(ValueError, match="do_layer_norm_before=False"):
        insert_adapter(opt)


def test_config_json_roundtrip_and_validation():
    cfg = AdapterConfig("base", "llama", "f" * 64, num_layers=2, init="kaiming", lora_rank=8, lora_alpha=16)
    assert AdapterConfig.from_json(cfg.to_json()) == cfg
    assert '"format": "aligndial-layer-adapter"' in cfg.to_json()
    with pytest.raises(ValueError, match="init must be one of .*got 'zeros'"):
        AdapterConfig("base", "llama", "f", init="zeros")
    with pytest.raises(ValueError, match="needs lora_rank"):
        AdapterConfig("base", "llama", "f", lora_alpha=2.0)


# --- save / load -------------------------------------------------------------------------------


@pytest.fixture
def saved(tok, batch, tmp_path):
    """A trained-looking LoRA adapter (kaiming projections, moved B) on llama seed 0, saved."""
    model = tiny.build_model("llama", tok)
    insert_adapter(model, init="kaiming", lora_rank=4, seed=3)
    with torch.no_grad():
        for name, p in adapter_parameters(model):
            if name.endswith(".lora_B"):
                p.add_(0.1)
    out = save_adapter(model, tmp_path / "adapter")
    return out, logits(model, batch)


def test_save_writes_only_adapter_files(saved):
    out, _ = saved
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    keys = load_file(out / "adapter_model.safetensors").keys()
    assert "layers.0.self_attn.q_proj.base.weight" in keys and "layers.0.self_attn.q_proj.lora_A" in keys
    assert all(k.startswith("layers.0.") for k in keys)
    assert not list(out.parent.glob(".adapter.*"))  # no temp dir left behind


def test_save_load_roundtrip_and_overwrite(saved, tok, batch):
    out, adapted_logits = saved
    fresh = tiny.build_model("llama", tok)
    cfg = load_adapter(fresh, out)
    assert (cfg.init, cfg.lora_rank, cfg.num_layers) == ("kaiming", 4, 1)
    assert torch.equal(logits(fresh, batch), adapted_logits)
    assert layer_indices(fresh) == list(range(3))
    save_adapter(fresh, out)  # overwriting an existing adapter directory
    again = tiny.build_model("llama", tok)
    load_adapter(again, out)
    assert torch.equal(logits(again, batch), adapted_logits)


def test_save_load_full_layers_gpt2(tok, batch, tmp_path):
    """Plain (non-LoRA) form, two layers, GPT-2's transposed Conv1D with kaiming projections."""
    model = tiny.build_model("gpt2", tok)
    insert_adapter(model, num_layers=2, init="kaiming", seed=5)
    keys = load_file(save_adapter(model, tmp_path / "a") / "adapter_model.safetensors").keys()
    assert {"layers.0.attn.c_proj.weight", "layers.1.mlp.c_proj.bias"} <= keys
    assert not any(k.startswith("layers.2.") for k in keys)
    fresh = tiny.build_model("gpt2", tok)
    load_adapter(fresh, tmp_path / "a")
    assert fresh.config.n_layer == 4
    assert torch.equal(logits(fresh, batch), logits(model, batch))


def assert_unchanged(model, batch, base_logits, layers=2):
    assert len(decoder_layers(model)) == model.config.num_hidden_layers == layers
    assert not hasattr(model, "aligndial_adapter")
    assert torch.equal(logits(model, batch), base_logits)


def test_load_on_other_base_is_refused(saved, tok, batch):
    out, _ = saved
    wider = tiny.build_model("llama", tok, hidden=32)
    base_logits = logits(wider, batch)
    with pytest.raises(ValueError, match="fingerprint"):
        load_adapter(wider, out)
    assert_unchanged(wider, batch, base_logits)
    other = tiny.build_model("qwen2", tok)
    with pytest.raises(ValueError, match="'llama' but the model is 'qwen2'"):
        load_adapter(other, out)


def test_truncated_file_is_refused(saved, tok, batch):
    out, _ = saved
    weights = out / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    model = tiny.build_model("llama", tok)
    base_logits = logits(model, batch)
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        load_adapter(model, out)
    assert_unchanged(model, batch, base_logits)


@pytest.mark.parametrize("edit", ["missing", "extra", "shape"])
def test_wrong_keys_are_named(edit, saved, tok, batch):
    out, _ = saved
    weights = out / "adapter_model.safetensors"
    tensors = load_file(weights)
    if edit == "missing":
        del tensors["layers.0.mlp.down_proj.lora_B"]
        expect = "missing keys: layers.0.mlp.down_proj.lora_B"
    elif edit == "extra":
        tensors["layers.1.surprise"] = torch.zeros(2)
        expect = "unexpected keys: layers.1.surprise"
    else:
        tensors["layers.0.mlp.up_proj.lora_A"] = torch.zeros(5, 3)
        expect = r"shape mismatches: layers.0.mlp.up_proj.lora_A \(5, 3\)"
    save_file(tensors, weights)
    model = tiny.build_model("llama", tok)
    base_logits = logits(model, batch)
    with pytest.raises(ValueError, match=expect):
        load_adapter(model, out)
    assert_unchanged(model, batch, base_logits)


class _Payload:
    """Unpickling this creates a marker file: proof that the pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_only_adapter_is_refused_and_never_runs(saved, tok, batch, tmp_path):
    out, _ = saved
    marker = tmp_path / "pwned"
    (out / "adapter_model.safetensors").unlink()
    with open(out / "adapter_model.bin", "wb") as f:
        pickle.dump({"layers.0.x": _Payload(marker)}, f, protocol=2)
    model = tiny.build_model("llama", tok)
    base_logits = logits(model, batch)
    with pytest.raises(ValueError, match=r"adapter_model\.bin.*requires adapter_model\.safetensors.*convert"):
        load_adapter(model, out)
    with pytest.raises(ValueError, match=r"adapter_model\.bin.*weights_only"):
        load_adapter(model, out, allow_pickle=True)
    assert not marker.exists()
    assert_unchanged(model, batch, base_logits)


def test_allow_pickle_loads_a_plain_tensor_pickle(saved, tok, batch):
    out, adapted_logits = saved
    weights = out / "adapter_model.safetensors"
    torch.save(load_file(weights), out / "adapter_model.bin")
    weights.unlink()
    model = tiny.build_model("llama", tok)
    load_adapter(model, out, allow_pickle=True)
    assert torch.equal(logits(model, batch), adapted_logits)


def test_fingerprint_is_shape_based(tok):
    assert fingerprint(tiny.build_model("llama", tok, seed=0)) == fingerprint(tiny.build_model("llama", tok, seed=1))
    assert fingerprint(tiny.build_model("llama", tok)) != fingerprint(tiny.build_model("llama", tok, hidden=32))


# --- training -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "lora_rank"), [("llama", None), ("llama", 4), ("gpt2", 4)])
def test_freeze_base_trains_only_the_adapter(arch, lora_rank, tok, batch):
    """TRL-style: clone, train 3 SGD steps, every trainable param moved and no frozen one did.

    Identity init zeroes o_proj/down_proj, so at step 1 only they (and LoRA B) get gradient; the
    rest of the layer (and LoRA A) starts moving once those are non-zero.
    """
    model = tiny.build_model(arch, tok)
    insert_adapter(model, lora_rank=lora_rank)
    freeze_base(model)
    trainable = dict(adapter_parameters(model))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(trainable)
    if lora_rank:
        assert all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    model.train()
    optimizer = torch.optim.SGD(trainable.values(), lr=0.5)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()

    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (name in trainable), name


def test_adapter_init_use_and_merge_on_the_qwen3_replica(replicas, tmp_path):
    """The CLI's adapter round trip on a Qwen3-shaped bf16 checkpoint with a tied, padded head:
    init writes adapter files only; the dual path at λ=0 is the base model and at λ=1 the merged
    model, token for token; the merged model stays tied, bf16 and 151936 rows wide."""
    from aligndial.cli import main
    from aligndial.dualpath import DualPathModel
    from replicas import CHAT_PROBE, QWEN3_HEAD_ROWS

    base_dir = replicas.qwen3("instruct")
    adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    assert main(["adapter", "init", "--model", base_dir, "--out", str(adapter_dir), "--init", "kaiming"]) == 0
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert main(["adapter", "merge", "--model", base_dir, "--adapter", str(adapter_dir), "--out", str(merged_dir)]) == 0

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    enc = tok.apply_chat_template([CHAT_PROBE, [{"role": "user", "content": "Hi"}]], add_generation_prompt=True,
                                  return_dict=True, return_tensors="pt", padding=True)

    def greedy_of(model, **kw):
        with torch.no_grad():
            return model.generate(**enc, do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id, **kw)

    plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto").eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype="auto").eval()
    assert merged.dtype == torch.bfloat16 and _tied(merged)
    assert merged.get_output_embeddings().weight.shape[0] == QWEN3_HEAD_ROWS
    dual = DualPathModel.from_adapter(AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto"), str(adapter_dir))
    assert torch.equal(greedy_of(dual, lam=0.0), greedy_of(plain))
    assert torch.equal(greedy_of(dual, lam=1.0), greedy_of(merged))
    assert not torch.equal(greedy_of(merged), greedy_of(plain))  # kaiming init: the adapter does something
