"""λ sweeps, metrics, schedules and the lm-eval model type, on tiny seeded models.

Oracles: plain transformers models mixed by hand in float64 (KL, pairwise accuracy, lm-eval
log-likelihoods), single-λ generation (per-turn schedule), a step-by-step greedy loop reading
the <think> span from the decoded text (per-token schedule), and a real HTTP judge on 127.0.0.1.
"""

import glob
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import matplotlib.image
import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from aligndial.cli import main
from aligndial.evaluate import SweepConfig, select_lam, summarize, sweep
from aligndial.generation import generate_rows, render_prompts
from aligndial.metrics import Accuracy, parse_metric, pairwise_scores
from aligndial.pair import RealignedPair
from aligndial.scoring import position_lams, think_schedule

PROMPTS = [{"prompt": "The quick brown fox"}, {"prompt": "Hello"}, {"prompt": "Numbers such as 12 and 345 appear"}]


@pytest.fixture(scope="module")
def dirs(model_dirs):
    ref, aligned, _ = model_dirs["llama"]
    return ref, aligned


@pytest.fixture(scope="module")
def pair(dirs):
    return RealignedPair.from_pretrained(*dirs)


@pytest.fixture(scope="module")
def plain64(dirs):
    """The two plain HF models in float64: the hand-computation oracle."""
    return [AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64).eval() for d in dirs]


def hand_logps(plain64, ids: list[int], lam: float) -> torch.Tensor:
    """log softmax((1 − λ)·h_ref + λ·h_aligned) at every position, float64, (T, V)."""
    with torch.no_grad():
        ref, aligned = (m(torch.tensor([ids])).logits[0] for m in plain64)
    return torch.log_softmax((1 - lam) * ref + lam * aligned, dim=-1)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.slow
def test_sweep_cli_writes_rows_summary_plots_and_selects(capsys, tmp_path, monkeypatch, dirs):
    ref, aligned = dirs
    (tmp_path / "toy_reward.py").write_text("def score(prompt, response):\n    return float(len(set(response)))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    val = write_jsonl(tmp_path / "val.jsonl", [{"prompt": "Hello, how are you"}, {"prompt": "Once upon a time"}])
    out = tmp_path / "sweep"
    code = main(["sweep", "--ref", ref, "--aligned", aligned, "--lams", "0,1,2", "--prompts", prompts,
                 "--metric", "kl", "--metric", "length", "--metric", "reward:toy_reward:score", "--out", str(out),
                 "--max-new-tokens", "5", "--select", "reward", "--on", val, "--max-kl", "1e9"])
    stdout = capsys.readouterr().out
    assert code == 0
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert [(r["lam"], r["prompt_index"]) for r in rows] == [(lam, i) for lam in (0.0, 1.0, 2.0) for i in range(3)]
    for r in rows:
        assert {"text", "token_ids", "context", "kl", "length", "reward"} <= set(r)
        assert r["length"] == len(r["token_ids"]) and r["reward"] == len(set(r["text"]))
    csv_lines = (out / "summary.csv").read_text().splitlines()
    assert csv_lines[0].startswith("lam,n,kl_mean,kl_sem,kl_n,length_mean") and len(csv_lines) == 4
    for name in ("plot-kl", "plot-length", "plot-reward", "frontier"):
        image = matplotlib.image.imread(out / f"{name}.png")
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300 and image.std() > 0.01
    assert stdout.splitlines()[0].split() == ["λ", "n", "kl", "length", "reward"]
    selection = json.loads((out / "selection.json").read_text())
    assert f"selected on {val}: λ=" in stdout and selection["reason"] in stdout
    assert selection["value"] == pytest.approx(max(_csv_means(out / "validation" / "summary.csv", "reward")))


def _csv_means(path, metric):
    import csv

    return [float(row[f"{metric}_mean"]) for row in csv.DictReader(open(path))]


def test_resumed_sweep_skips_finished_rows(capsys, tmp_path, pair, monkeypatch):
    config = dict(metrics=["length", "kl"], max_new_tokens=4, batch_size=2)
    out = tmp_path / "sweep"
    first, _ = sweep(pair, pair.tokenizer, PROMPTS, SweepConfig(lams=[0, 1], **config), out=out)
    generated = []
    real_generate = pair.generate

    def counting_generate(*args, **kwargs):  # a spy: the real generate runs
        generated.append(kwargs["input_ids"].shape[0])
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(pair, "generate", counting_generate)
    rows, summary = sweep(pair, pair.tokenizer, PROMPTS, SweepConfig(lams=[0, 0.5, 1], **config), out=out)
    assert sum(generated) == len(PROMPTS)  # only the new λ=0.5 rows
    assert [r["text"] for r in rows if r["lam"] != 0.5] == [r["text"] for r in first]
    assert [e["lam"] for e in summary] == [0, 0.5, 1] and all(e["kl_n"] == 3 for e in summary)

    # A run stopped mid-write leaves a cut-off last line: that row alone is generated again.
    path = out / "rows.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    generated.clear()
    with pytest.warns(UserWarning, match=r"rows.jsonl:9: dropped a row cut off mid-write"):
        again, _ = sweep(pair, pair.tokenizer, PROMPTS, SweepConfig(lams=[0, 0.5, 1], **config), out=out)
    assert sum(generated) == 1 and [r["text"] for r in again] == [r["text"] for r in rows]
    assert len(path.read_text().splitlines()) == 9

    # Stopped between a whole row and its newline: the row is kept, and a resume that appends
    # new rows must not run them into that line (a later rerun then refused the file).
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:8]).rstrip("\n"))

    def stopped_after_one_batch(*args, **kwargs):  # the first batch holds two λ: two generate calls
        if len(generated) == 2:
            raise KeyboardInterrupt
        return counting_generate(*args, **kwargs)

    generated.clear()
    monkeypatch.setattr(pair, "generate", stopped_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        sweep(pair, pair.tokenizer, PROMPTS, SweepConfig(lams=[0, 0.5, 1, 2], **config), out=out)
    assert len([json.loads(line) for line in path.read_text().splitlines()]) == 8 + config["batch_size"]

    with pytest.raises(ValueError, match="max_new_tokens: 4 there, 6 now"):
        sweep(pair, pair.tokenizer, PROMPTS, SweepConfig(lams=[0], **{**config, "max_new_tokens": 6}), out=out)
    code = main(["sweep", "--model", "x", "--ref", "y", "--lams", "0", "--prompts", "p.jsonl", "--out", "o"])
    assert code == 2 and "Can't provide both `--ref` and `--model`" in capsys.readouterr().err
    code = main(["sweep", "--ref", "x", "--aligned", "y", "--lams", "0", "--select", "kl", "--out", "o"])
    assert code == 2 and "`--select METRIC` and `--on VALIDATION.jsonl` go together" in capsys.readouterr().err


def test_kl_is_zero_at_lam_zero_and_matches_float64(pair, plain64):
    """KL(π_λ ‖ π_ref) summed over sampled tokens = Σ_t Σ_v p_λ(v)(log p_λ(v) − log p_ref(v))."""
    config = SweepConfig(lams=[0, 0.5, 2], metrics=["kl"], max_new_tokens=6, do_sample=True, samples=2, seed=3)
    rows, summary = sweep(pair, pair.tokenizer, PROMPTS[:2], config)
    assert all(r["kl"] == 0.0 for r in rows if r["lam"] == 0) and summary[0]["kl_mean"] == 0.0
    for r in rows:
        if r["lam"] == 0:
            continue
        context = pair.tokenizer(r["context"])["input_ids"]
        ids = context + r["token_ids"]
        logp, logq = hand_logps(plain64, ids, r["lam"]), hand_logps(plain64, ids, 0.0)
        at = slice(len(context) - 1, len(ids) - 1)  # positions predicting the response tokens
        expected = (logp[at].exp() * (logp[at] - logq[at])).sum().item()
        assert r["kl"] == pytest.approx(expected, rel=1e-4), r
    assert summary[1]["kl_mean"] > 0 and summary[1]["kl_n"] == 4


def test_kl_of_the_dual_path_model_matches_its_own_mix(tok):
    """Scoring mixes the λ=0 and λ=1 logits in `mixing`; the dual-path model mixes hidden states
    before its head. The two agree (the weights sum to one), so KL is the model's own."""
    from aligndial.adapter import insert_adapter
    from aligndial.dualpath import DualPathModel
    from aligndial.tiny import build_model

    model = build_model("llama", tok, seed=0)
    insert_adapter(model, num_layers=1, init="kaiming", seed=1)
    dual = DualPathModel(model).eval()
    rows, _ = sweep(dual, tok, PROMPTS[:2], SweepConfig(lams=[1.5], metrics=["kl"], max_new_tokens=5))
    for r in rows:
        context = tok(r["context"])["input_ids"]
        ids = torch.tensor([context + r["token_ids"]])
        with torch.no_grad():
            logp, logq = (torch.log_softmax(dual(ids, lam=lam).logits[0].double(), -1) for lam in (1.5, 0.0))
        at = slice(len(context) - 1, ids.shape[1] - 1)
        assert r["kl"] == pytest.approx((logp[at].exp() * (logp[at] - logq[at])).sum().item(), rel=1e-4)
        assert r["kl"] > 0


def test_pairwise_accuracy_matches_hand_computation(tmp_path, pair, plain64):
    """DeRa Eq. 14: 1[(1/|y_w|) log π(y_w|x) > (1/|y_l|) log π(y_l|x)], length-normalised by tokens."""
    pairs = [{"prompt": "The quick brown", "chosen": " fox jumps", "rejected": " dog sleeps all day"},
             {"prompt": "Hello,", "chosen": " how are you", "rejected": " zebra"},
             {"prompt": "2 + 3 =", "chosen": " 5", "rejected": " 56 apples"}]
    tok, lams = pair.tokenizer, [0.0, 0.5, 2.0]
    scores = pairwise_scores(pair, tok, pairs, lams, batch_size=2)
    expected_acc = {}
    for lam in lams:
        flags = []
        for j, p in enumerate(pairs):
            context = tok(p["prompt"])["input_ids"]
            got = next(s for s in scores if s["pair"] == j and s["lam"] == lam)
            hand = {}
            for side in ("chosen", "rejected"):
                response = tok(p[side], add_special_tokens=False)["input_ids"]
                logp = hand_logps(plain64, context + response, lam)[len(context) - 1 : -1]
                hand[side] = logp.gather(-1, torch.tensor(response)[:, None]).sum().item() / len(response)
                assert got[side] == pytest.approx(hand[side], abs=1e-4)
            flags.append(float(hand["chosen"] > hand["rejected"]))
            assert got["correct"] == flags[-1]
        expected_acc[lam] = sum(flags) / len(flags)
    # Through a sweep: no prompts, so no generation at all.
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    rows, summary = sweep(pair, tok, [], SweepConfig(lams=lams, metrics=[f"pairwise-accuracy:{data}"]))
    assert rows == [] and [e["pairwise-accuracy_mean"] for e in summary] == [expected_acc[lam] for lam in lams]
    assert len(set(expected_acc.values())) > 1  # the dataset discriminates between λ


def test_select_lam_picks_the_argmax_under_the_kl_constraint():
    rows = [{"lam": lam, "reward": reward + noise, "kl": kl}
            for lam, reward, kl in ((0.0, 0.1, 0.0), (0.5, 0.5, 2.0), (1.0, 0.8, 4.0), (2.0, 0.9, 9.0))
            for noise in (-0.01, 0.01)]
    summary = summarize(rows, [0.0, 0.5, 1.0, 2.0], ["reward", "kl"])
    assert summary[2]["reward_mean"] == pytest.approx(0.8) and summary[2]["reward_sem"] == pytest.approx(0.01)
    assert select_lam(summary, "reward")["lam"] == 2.0
    choice = select_lam(summary, "reward", max_kl=5)
    assert choice["lam"] == 1.0 and choice["value"] == pytest.approx(0.8)
    assert "with KL ≤ 5 (over it: λ=2 KL 9)" in choice["reason"] and "runner-up λ=0.5" in choice["reason"]
    with pytest.raises(ValueError, match=r"no λ has reward measured and KL ≤ -1 \(smallest: KL 0 at λ=0\)"):
        select_lam(summary, "reward", max_kl=-1)
    with pytest.raises(ValueError, match="KL is a constraint"):
        select_lam(summary, "kl")
    with pytest.raises(ValueError, match="`--select judge` was not measured"):
        select_lam(summary, "judge")


def _rank(text: str) -> tuple:
    """The judge's fixed rule: the longer answer wins, ties broken by the larger string."""
    return len(text), text


@pytest.fixture
def judge_server():
    """A real OpenAI-compatible chat endpoint on 127.0.0.1 that judges by `_rank` and logs requests."""
    log = []

    class Handler(BaseHTTPRequestHandler):
        def _send(self, payload):
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            assert self.path == "/v1/models"
            model = {"id": "rule-judge", "object": "model", "created": 0, "owned_by": "test"}
            self._send({"object": "list", "data": [model]})

        def do_POST(self):
            assert self.path == "/v1/chat/completions"
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            content = request["messages"][-1]["content"]
            first = content.split("<response1>", 1)[1].split("</response1>", 1)[0]
            second = content.split("<response2>", 1)[1].split("</response2>", 1)[0]
            log.append({"model": request["model"], "first": first, "second": second})
            verdict = "1" if _rank(first) > _rank(second) else "2"
            self._send({"id": "c", "object": "chat.completion", "created": 0, "model": request["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": verdict}}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", log
    server.shutdown()
    server.server_close()


def test_judge_win_rate_with_positions_swapped_back(pair, judge_server):
    url, log = judge_server
    prompts = PROMPTS + [{"prompt": "Once upon a time"}, {"prompt": "I am fine"}]
    config = SweepConfig(lams=[0, 1, 2], metrics=[f"judge:{url}"], max_new_tokens=4, judge_baseline_lam=1.0, seed=0)
    rows, summary = sweep(pair, pair.tokenizer, prompts, config)
    base = {r["prompt_index"]: r["text"] for r in rows if r["lam"] == 1.0}
    for r in rows:
        ours, theirs = _rank(r["text"]), _rank(base[r["prompt_index"]])
        assert r["judge"] == (0.5 if ours == theirs else float(ours > theirs)), r
    assert summary[1]["judge_mean"] == 0.5  # the baseline against itself: ties, never sent
    compared = [r for r in rows if r["text"] != base[r["prompt_index"]]]
    assert len(log) == len(compared) == 10 and {e["model"] for e in log} == {"rule-judge"}
    positions = {"first" if e["first"] == r["text"] else "second" for e, r in zip(log, compared)}
    assert positions == {"first", "second"}  # order randomised, verdicts swapped back
    for lam, entry in zip((0, 2), (summary[0], summary[2])):
        wins = [r["judge"] for r in rows if r["lam"] == lam]
        assert entry["judge_mean"] == pytest.approx(sum(wins) / len(wins))


def test_per_turn_schedule_uses_the_first_lam_then_the_later_lam(pair):
    """CLM Table 4: λ1 on the first assistant turn, λ2 on later turns, replies fed back."""
    tok = pair.tokenizer
    turns = [{"role": "user", "content": "Hello"}, {"role": "user", "content": "The quick brown fox"}]
    prompts = [{"messages": turns}, {"prompt": "Numbers such as 12"}]
    config = SweepConfig(lams=[1.0], lam_schedules=[(1.0, 0.3)], max_new_tokens=5, chat=True)
    rows, summary = sweep(pair, tok, prompts, config)
    single = {r["lam"] if isinstance(r["lam"], float) else tuple(r["lam"]): r for r in rows if r["prompt_index"] == 0}
    scheduled, plain_one = single[(1.0, 0.3)], single[1.0]

    def alone(messages, lam):
        text = render_prompts(tok, [messages], chat=True)
        return generate_rows(pair, tok, text, lam=lam, add_special_tokens=False, max_new_tokens=5, do_sample=False)[0]

    first = alone(turns[:1], 1.0)
    assert [t["lam"] for t in scheduled["turns"]] == [1.0, 0.3]
    assert scheduled["turns"][0]["token_ids"] == first["token_ids"] == plain_one["turns"][0]["token_ids"]
    history = [turns[0], {"role": "assistant", "content": first["text"]}, turns[1]]
    assert scheduled["token_ids"] == alone(history, 0.3)["token_ids"]
    assert plain_one["token_ids"] == alone(history, 1.0)["token_ids"] != scheduled["token_ids"]
    one_turn = next(r for r in rows if r["prompt_index"] == 1 and r["lam"] == [1.0, 0.3])
    assert "turns" not in one_turn  # a single-turn prompt answers with the first-turn λ
    assert one_turn["token_ids"] == alone([{"role": "user", "content": "Numbers such as 12"}], 1.0)["token_ids"]
    assert [e["lam"] for e in summary] == [1.0, [1.0, 0.3]]


class ForceAfter(LogitsProcessor):
    """Forces `ids` from generated step `at` on (a real HF logits processor), to close a span."""

    def __init__(self, prompt_len: int, at: int, ids: list[int]):
        self.prompt_len, self.at, self.ids = prompt_len, at, ids

    def __call__(self, input_ids, scores):
        t = input_ids.shape[1] - self.prompt_len - self.at
        if 0 <= t < len(self.ids):
            scores = torch.full_like(scores, float("-inf"))
            scores[:, self.ids[t]] = 0.0
        return scores


def test_per_token_schedule_switches_lam_at_the_span_boundary(capsys, pair, dirs):
    tok, think, outside = pair.tokenizer, 2.0, 0.0
    close = tok("</think>", add_special_tokens=False)["input_ids"]
    enc = tok(["Hello <think>"], return_tensors="pt")
    start, steps = enc["input_ids"].shape[1], 3 + len(close) + 4
    force = LogitsProcessorList([ForceAfter(start, 3, close)])
    out = pair.generate(**enc, lam=think_schedule(tok, think, torch.tensor([outside])), max_new_tokens=steps,
                        do_sample=False, logits_processor=force)[0, start:].tolist()
    # The oracle: a greedy loop that reads the span off the decoded text before every step.
    ids, lams = enc["input_ids"][0].tolist(), []
    for t in range(steps):
        text = tok.decode(ids)
        lams.append(think if text.rfind("<think>") > text.rfind("</think>") else outside)
        with torch.no_grad():
            logits = pair(torch.tensor([ids]), lam=lams[-1]).logits[0, -1]
        ids.append(close[t - 3] if 3 <= t < 3 + len(close) else int(logits.argmax()))
    assert out == ids[start:]
    assert lams == [think] * (3 + len(close)) + [outside] * 4  # switches once "</think>" is complete
    assert position_lams(tok, ids[:start], out, outside, think).tolist() == lams

    # In a sweep: inside an open span the row is generated at think_lam, a plain prompt at its own λ.
    rows, _ = sweep(pair, tok, [{"prompt": "Hello <think>"}, {"prompt": "Hello"}],
                    SweepConfig(lams=[0.0], think_lam=think, metrics=["kl"], max_new_tokens=4))
    at = {lam: generate_rows(pair, tok, ["Hello <think>", "Hello"], lam=lam, max_new_tokens=4, do_sample=False)
          for lam in (think, 0.0)}
    assert rows[0]["token_ids"] == at[think][0]["token_ids"] and rows[1]["token_ids"] == at[0.0][1]["token_ids"]
    assert rows[0]["kl"] > 0 and rows[1]["kl"] == 0.0

    # `aligndial generate --think-lam`: the same schedule from the command line.
    code = main(["generate", "--ref", dirs[0], "--aligned", dirs[1], "--lam", "0", "--think-lam", "2",
                 "--prompt", "Hello <think>", "--max-new-tokens", "4", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["token_ids"] == at[think][0]["token_ids"]


def test_metric_specs_accuracy_and_errors(tmp_path):
    accuracy = Accuracy(r"answer is (\d+)")
    rows = [{"text": "first 3, so the answer is 42", "answer": 42, "prompt_index": 0},
            {"text": "the answer is 41", "answer": "42", "prompt_index": 1},
            {"text": "no idea", "answer": "42", "prompt_index": 2}]
    assert accuracy(rows, None) == [1.0, 0.0, 0.0]
    assert Accuracy(r"\d+")([{"text": "7 then 8", "answer": "8", "prompt_index": 0}], None) == [1.0]
    for spec, message in (("bleu", "unknown metric 'bleu'; use one of: reward:module:function"),
                          ("reward:nomodule", "must be reward:module:function"),
                          ("reward:no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
                          ("accuracy:(", "not a valid regular expression"),
                          (f"pairwise-accuracy:{write_jsonl(tmp_path / 'bad.jsonl', [{'prompt': 'x'}])}",
                           r"bad.jsonl:1: missing field\(s\) 'chosen', 'rejected'")):
        with pytest.raises(ValueError, match=message):
            parse_metric(spec)
    with pytest.raises(ValueError, match="samples 3.* repeats one response; add `--do-sample`"):
        SweepConfig(lams=[0], samples=3)
    with pytest.raises(ValueError, match="`lams` must be a finite number; got nan"):
        SweepConfig(lams=[float("nan")])


def test_reward_model_metric_scores_with_the_classifier(tmp_path, tok, pair):
    from transformers import AutoModelForSequenceClassification

    from aligndial.metrics import RewardModel, Scoring
    from aligndial.tiny import save, tiny_config

    config = tiny_config("llama", vocab_size=len(tok), num_labels=1)
    torch.manual_seed(0)
    save(AutoModelForSequenceClassification.from_config(config).eval(), tok, tmp_path / "rm")
    rm = RewardModel(str(tmp_path / "rm"))
    rows = [{"prompt": "Hi", "context": "<|user|>Hi</s><|assistant|>", "text": "Hello there"},
            {"prompt": "Yo", "context": "<|user|>Yo</s><|assistant|>", "text": "A longer answer than that"}]
    got = rm(rows, Scoring(pair, tok))
    for row, value in zip(rows, got):
        text = tok.apply_chat_template([{"role": "user", "content": row["prompt"]},
                                        {"role": "assistant", "content": row["text"]}], tokenize=False)
        with torch.no_grad():
            alone = rm.model(**tok(text, return_tensors="pt")).logits[0, 0].item()
        assert value == pytest.approx(alone, abs=1e-5)


@pytest.mark.slow
def test_lm_eval_runs_local_tasks_through_the_registered_model(tmp_path, dirs, pair, plain64):
    """`aligndial lm-eval --model aligndial` on three local YAML tasks over local JSONL files:
    loglikelihood (multiple choice), loglikelihood_rolling and generate_until, all under π_0.5."""
    pytest.importorskip("lm_eval")
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"question": "The quick brown", "choices": [" fox", " dog"], "label": 0},
                                                 {"question": "Hello, how are", "choices": [" you", " me"], "label": 0}])
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": "The quick brown fox jumps."}, {"text": "Hello, how are you?"}])
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    common = "dataset_path: json\ntest_split: test\n"
    (tasks / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {docs}\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    (tasks / "tiny_ppl.yaml").write_text(
        f"task: tiny_ppl\n{common}dataset_kwargs:\n  data_files:\n    test: {texts}\noutput_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n")
    (tasks / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {docs}\noutput_type: generate_until\n"
        "doc_to_text: '{{question}}'\ndoc_to_target: '{{choices[0]}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 5\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    code = main(["lm-eval", "--model", "aligndial", "--model_args", f"ref={dirs[0]},aligned={dirs[1]},lam=0.5",
                 "--tasks", "tiny_mc,tiny_ppl,tiny_gen", "--include_path", str(tasks), "--device", "cpu",
                 "--batch_size", "2", "--output_path", str(tmp_path / "results"), "--log_samples"])
    assert code == 0

    def samples(task):
        (path,) = glob.glob(str(tmp_path / "results" / "*" / f"samples_{task}_*.jsonl"))
        return [json.loads(line) for line in open(path)]

    tok = pair.tokenizer
    for s in samples("tiny_mc"):  # HFLM encodes context + continuation whole, then splits
        for args, (resp, _) in zip(s["arguments"].values(), s["filtered_resps"]):
            context, continuation = args["arg_0"], args["arg_1"]
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
            logp = hand_logps(plain64, whole, 0.5)[len(ctx) - 1 : -1]
            expected = logp.gather(-1, torch.tensor(whole[len(ctx) :])[:, None]).sum().item()
            assert float(resp) == pytest.approx(expected, abs=1e-3)
    for s in samples("tiny_ppl"):  # one window: the prefix (BOS) token predicts the whole text
        ids = [tok.bos_token_id] + tok(s["doc"]["text"], add_special_tokens=False)["input_ids"]
        logp = hand_logps(plain64, ids, 0.5)[:-1]
        expected = logp.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()
        assert float(s["filtered_resps"][0]) == pytest.approx(expected, abs=1e-3)
    for s in samples("tiny_gen"):
        row = generate_rows(pair, tok, [s["doc"]["question"]], lam=0.5, add_special_tokens=False,
                            max_new_tokens=5, do_sample=False)[0]
        assert s["filtered_resps"][0] == row["text"].split("\n")[0]


def test_a_sweep_that_fails_validation_leaves_its_out_dir_reusable(tmp_path, pair):
    """A run refused before generating writes nothing, so the corrected rerun is not refused."""
    messages = [{"messages": [{"role": "user", "content": "Hi"}]}]
    out = tmp_path / "sweep"
    with pytest.raises(ValueError, match="needs `--chat`"):
        sweep(pair, pair.tokenizer, messages, SweepConfig(lams=[0], max_new_tokens=2), out=out)
    assert not (out / "config.json").exists()
    rows, _ = sweep(pair, pair.tokenizer, messages, SweepConfig(lams=[0], max_new_tokens=2, chat=True), out=out)
    assert len(rows) == 1 and json.loads((out / "config.json").read_text())["chat"] is True


def test_reward_module_imports_from_the_current_directory(tmp_path, monkeypatch):
    """As with `python -m`: `--metric reward:my_rewards:helpfulness` finds ./my_rewards.py without
    PYTHONPATH, although a console script's sys.path holds no current directory."""
    (tmp_path / "my_rewards_h5.py").write_text("def helpfulness(prompt, response):\n    return 2.5\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", ".", str(tmp_path))])
    metric = parse_metric("reward:my_rewards_h5:helpfulness")
    assert metric.fn("p", "r") == 2.5
    assert str(tmp_path) not in __import__("sys").path  # nothing left behind


PREFS = [{"prompt": "The quick brown", "chosen": " fox jumps", "rejected": " dog sleeps all day"},
         {"prompt": "Hello,", "chosen": " how are you", "rejected": " zebra"},
         {"prompt": "2 + 3 =", "chosen": " 5", "rejected": " 56 apples"}]


def test_pairwise_accuracy_on_trl_conversational_rows(capsys, tmp_path, pair, plain64, dirs):
    """The preference file `train dpo` takes (TRL's conversational format) scores with `--chat`,
    split into prompt and replies exactly as TRL's own `apply_chat_template` splits it."""
    from trl.data_utils import apply_chat_template

    tok = pair.tokenizer
    conv = [{"prompt": [{"role": "user", "content": p["prompt"]}], "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in PREFS]
    lams = [0.0, 2.0]
    scores = pairwise_scores(pair, tok, conv, lams, chat=True)
    for j, row in enumerate(conv):
        trl_row = apply_chat_template(row, tok)  # {"prompt", "chosen", "rejected"} as text
        context = tok(trl_row["prompt"], add_special_tokens=False)["input_ids"]
        for lam in lams:
            got = next(s for s in scores if s["pair"] == j and s["lam"] == lam)
            for side in ("chosen", "rejected"):
                response = tok(trl_row[side], add_special_tokens=False)["input_ids"]
                logp = hand_logps(plain64, context + response, lam)[len(context) - 1 : -1]
                hand = logp.gather(-1, torch.tensor(response)[:, None]).sum().item() / len(response)
                assert got[side] == pytest.approx(hand, abs=1e-4)
    # Without --chat: one line that says what to add, before any model loads.
    data = write_jsonl(tmp_path / "conv.jsonl", conv)
    ref, aligned = dirs
    code = main(["sweep", "--ref", ref, "--aligned", aligned, "--lams", "0", "--metric", f"pairwise-accuracy:{data}",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == (f"aligndial sweep: error: {data}: pair 1 is conversational (lists of messages, "
                                         "as `train dpo` takes); add `--chat` to render it with the chat template")


def test_pairwise_only_sweep_counts_its_pairs(capsys, tmp_path, dirs):
    """No prompts, no generation: the summary's n is the number of pairs scored at each λ."""
    ref, aligned = dirs
    data = write_jsonl(tmp_path / "pairs.jsonl", PREFS)
    code = main(["sweep", "--ref", ref, "--aligned", aligned, "--lams", "0,1", "--metric", f"pairwise-accuracy:{data}",
                 "--out", str(tmp_path / "o"), "--json"])
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert code == 0 and [(e["n"], e["pairwise-accuracy_n"]) for e in summary] == [(3, 3), (3, 3)]


@pytest.mark.slow
def test_sweep_progress_is_one_line_per_batch_when_piped(tmp_path, dirs):
    """Piped stderr (CI logs, `| tee`) gets one progress line per finished batch of (prompt, λ) rows,
    not a terminal bar that shows nothing until the end."""
    import os
    import subprocess
    import sys

    ref, aligned = dirs
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    proc = subprocess.run(
        [sys.executable, "-m", "aligndial.cli", "sweep", "--ref", ref, "--aligned", aligned, "--lams", "0,1",
         "--prompts", prompts, "--max-new-tokens", "3", "--batch-size", "2", "--out", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("generating:")]
    assert [line.split(" rows")[0] for line in lines] == [f"generating: {n}/6" for n in (2, 4, 6)], proc.stderr
