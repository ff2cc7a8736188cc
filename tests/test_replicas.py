"""The replicas are what the other tests trust to look like real checkpoints: check that they do."""

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from replicas import CHAT_PROBE, QWEN3_ENDOFTEXT, QWEN3_HEAD_ROWS, QWEN3_IM_END, QWEN3_TOKENS


def _greedy_reply(path: str) -> list[int]:
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    enc = tok.apply_chat_template(CHAT_PROBE, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def test_qwen3_replicas_are_shaped_like_the_published_checkpoints(replicas):
    base, instruct = replicas.qwen3("base"), replicas.qwen3("instruct")
    for path, eos_token, eos_ids in ((base, "<|endoftext|>", QWEN3_ENDOFTEXT),
                                     (instruct, "<|im_end|>", [QWEN3_IM_END, QWEN3_ENDOFTEXT])):
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
        assert len(tok) == QWEN3_TOKENS and tok.eos_token == eos_token and tok.bos_token is None
        assert model.get_output_embeddings().weight.shape[0] == QWEN3_HEAD_ROWS
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        assert model.dtype == torch.bfloat16
        assert json.loads((Path(path) / "config.json").read_text())["tie_word_embeddings"] is True
        assert model.generation_config.eos_token_id == eos_ids
        assert model.get_output_embeddings().weight[QWEN3_TOKENS:].abs().sum() == 0  # padded rows
    assert AutoModelForCausalLM.from_pretrained(instruct).generation_config.do_sample is True  # as Qwen ships it


def test_qwen3_instruct_replica_ends_its_chat_reply_with_im_end(replicas):
    reply = _greedy_reply(replicas.qwen3("instruct", dtype="float32"))
    assert QWEN3_IM_END in reply and 3 <= reply.index(QWEN3_IM_END) + 1 <= 20


def test_llama3_replica_has_no_pad_and_its_template_writes_bos(replicas):
    path = replicas.llama3("instruct")
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.pad_token is None
    text = tok.apply_chat_template(CHAT_PROBE, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|begin_of_text|>")
    ids = tok(text)["input_ids"]  # the trap real Llama 3 sets: the tokenizer adds a second BOS
    assert ids[:2] == [tok.bos_token_id, tok.bos_token_id]
    reply = _greedy_reply(path)
    assert tok.convert_tokens_to_ids("<|eot_id|>") in reply


def test_gemma_replica_soft_caps_adds_bos_and_pads_left(replicas):
    path = replicas.gemma("instruct")
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    assert model.config.final_logit_softcapping == 30.0 and model.config.tie_word_embeddings
    assert tok("hi")["input_ids"][0] == tok.bos_token_id and tok.padding_side == "left"
    with torch.no_grad():
        assert model(**tok(["hi there", "a"], return_tensors="pt", padding=True)).logits.abs().max() <= 30.0
