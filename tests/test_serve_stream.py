"""Streaming detokenizes incrementally (issue 26): each token decodes a window of a few ids and
scans for stop strings only in the text it added (plus the longest stop's length − 1 before it),
so the work per token stays bounded on a long stream, as in vLLM's incremental detokenizer."""

import pytest
from transformers import AutoTokenizer

from aligndial.serve.app import _ChoiceText
from replicas import _write_qwen3_tokenizer

TEXT = "Héllo wörld, 世界 🙂 the quick brown fox said: «ça va?» " * 300


@pytest.fixture(scope="module")
def qwen3_tok(tmp_path_factory):
    """The real Qwen3 tokenizer (byte-level BPE: CJK and emoji span several tokens)."""
    out = tmp_path_factory.mktemp("qwen3-tokenizer")
    _write_qwen3_tokenizer(out, "instruct")
    return AutoTokenizer.from_pretrained(out)


def stream(choice: _ChoiceText, ids: list[int]) -> str:
    out = ""
    for i, t in enumerate(ids):
        choice.add(t)
        final = choice.stopped or i == len(ids) - 1
        out += choice.delta(final=final)
        if final:
            break
    return out


def test_a_2000_token_stream_decodes_a_bounded_window_per_token(qwen3_tok):
    ids = qwen3_tok(TEXT)["input_ids"][:2000]
    assert len(ids) == 2000
    whole = qwen3_tok.decode(ids, skip_special_tokens=True)
    decoded, scanned = [0], [0]
    decode = qwen3_tok.decode
    choice = _ChoiceText(qwen3_tok, ["<never in this text>"])

    def counting_decode(token_ids, **kw):
        decoded[0] += len(token_ids)
        return decode(token_ids, **kw)

    find = getattr(choice, "_find_stop", None)

    def counting_find(text, start):
        scanned[0] += len(text) - start
        return find(text, start)

    choice.tokenizer = type("Counting", (), {"decode": staticmethod(counting_decode)})()
    if find is not None:
        choice._find_stop = counting_find
    assert stream(choice, ids) == whole and choice.text == whole
    assert decoded[0] <= 16 * len(ids), f"{decoded[0]} ids decoded for {len(ids)} tokens"
    assert find is not None and scanned[0] <= 2 * len(whole) + 40 * len(ids), f"{scanned[0]} characters scanned for {len(whole)}"


@pytest.mark.parametrize("stop", ["fox said", "🙂 the", "«ça", "va?» Héllo"])
def test_stop_strings_across_token_boundaries_cut_where_the_whole_text_would(qwen3_tok, stop):
    ids = qwen3_tok(TEXT)["input_ids"][:400]
    whole = qwen3_tok.decode(ids, skip_special_tokens=True)
    choice = _ChoiceText(qwen3_tok, [stop, "<never>"])
    assert stream(choice, ids) == whole[: whole.index(stop)]
    assert choice.stopped
