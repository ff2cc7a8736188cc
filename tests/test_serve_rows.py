"""Each request's row is its own (issue 26): its stopping, its failures, and the engine's end.

- docs/reliability.md case 36: a row stops on the EOS ids of the members its λ runs, as
  `aligndial generate` does, whatever other rows share its batch;
- case 38: a row whose λ-mix overflows the model's dtype fails alone, with a 400 naming λ and
  the dtype; the rows decoding beside it give the tokens they give alone;
- case 41: once the engine thread has stopped, every queued and every new request gets 503 at once.
"""

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from aligndial.dualpath import DualPathModel
from aligndial.loading import load_tokenizer
from aligndial.pair import RealignedPair
from aligndial.serve import HFEngine
from aligndial.continuous import STOPPED, GenerationRequest
from test_serve import NAME, Server, completion_ids, engine_events, error_of, oracle, wait_for

PROMPT = "The quick brown fox"
N = 24


# --- case 36: each row stops on the EOS of the members its λ runs --------------------------------------------


def _with_eos(src: str, dst, eos: int) -> str:
    shutil.copytree(src, dst)
    path = dst / "generation_config.json"
    cfg = json.loads(path.read_text())
    cfg["eos_token_id"] = eos
    path.write_text(json.dumps(cfg))
    return str(dst)


def test_case36_each_row_stops_on_the_eos_of_the_members_its_lam_runs(model_dirs, tmp_path, capsys):
    ref, _, aligned2 = model_dirs["llama"]
    flags = ["--prompt", PROMPT, "--max-new-tokens", str(N)]
    plain = oracle(capsys, "--ref", ref, "--aligned", aligned2, "--lam", "0", *flags)[0]
    assert len(plain) == N, "the reference should run to max tokens here"
    early = plain[2]  # the reference emits this token third
    aligned = _with_eos(aligned2, tmp_path / "aligned-early-eos", early)
    expected = {lam: oracle(capsys, "--ref", ref, "--aligned", aligned, "--lam", str(lam), *flags)[0]
                for lam in (0.0, 0.5, 1.0)}
    assert expected[0.0] == plain  # generate: λ=0 is the reference alone, its own EOS only
    pair = RealignedPair.from_pretrained(ref, aligned)
    with Server(HFEngine(pair, pair.tokenizer, 1, max_concurrency=8, max_queue=8)) as server:
        client = server.client()
        alone = {lam: completion_ids(client, PROMPT, lam, N) for lam in expected}
        assert alone == expected
        assert len(alone[0.0]) == N
        # The same requests side by side, λ=0 ones beside rows that do stop on the aligned EOS.
        order = [0.0, 0.5, 1.0, 0.0, 1.0, 0.0]
        start = threading.Barrier(len(order))

        def together(lam):
            start.wait()
            return completion_ids(client, PROMPT, lam, N)

        with ThreadPoolExecutor(len(order)) as pool:
            batched = list(pool.map(together, order))
        assert batched == [expected[lam] for lam in order]


def test_case36_schedules_stop_on_the_eos_of_every_member_they_may_run(model_dirs):
    """One function decides (aligndial.pair.stop_ids), for generate, the HF server and vLLM: a
    constant λ (one turn) stops on the members it weights; a per-token schedule (a callable, e.g.
    `--think-lam`) may weight any member at some step, so it stops on every member's EOS. A
    per-turn schedule runs each turn with its own constant λ, so each turn stops by its own λ."""
    from aligndial.pair import stop_ids
    from aligndial.vllm.run import stop_kwargs

    eos = [[2], [7, 9]]
    assert stop_ids(eos, 0.0, 1) == [2]
    assert stop_ids(eos, 1.0, 1) == [7, 9]
    assert stop_ids(eos, 0.5, 1) == [2, 7, 9]
    assert stop_ids(eos, lambda ids: 0.0, 1) == [2, 7, 9]
    assert stop_ids(eos, None, 1) == [2, 7, 9]
    assert stop_ids(eos, torch.tensor([0.0, 0.0]), 1, batch_size=2) == [2]
    for lam in (0.0, 0.5, 1.0, 2.0):
        assert stop_kwargs(eos, lam, 1)["stop_token_ids"] == stop_ids(eos, lam, 1)


# --- case 41: a stopped engine answers 503 at once -----------------------------------------------------------


def test_case41_after_the_engine_gives_up_queued_and_new_requests_get_503_at_once(model_dirs):
    """The engine thread faults on every turn (injected into its queue bookkeeping) until it gives
    up. While it stops (held open here), a new request arrives: it and the request that was
    queued both get 503, none waits for its client's timeout; /health says 503 too."""
    ref, aligned, _ = model_dirs["llama"]
    pair = RealignedPair.from_pretrained(ref, aligned)
    engine = HFEngine(pair, pair.tokenizer, 1)
    stopping, proceed = threading.Event(), threading.Event()

    def take_waiting_faults():
        raise RuntimeError("injected fault in the queue bookkeeping")

    fail = engine._fail

    def fail_slowly(rows, message, **kw):
        if message == STOPPED:  # the thread gave up and is emptying its queues
            stopping.set()
            proceed.wait(30)
        fail(rows, message, **kw)

    engine._take_waiting, engine._fail = take_waiting_faults, fail_slowly
    with Server(engine) as server, ThreadPoolExecutor(1) as pool:
        body = {"model": NAME, "prompt": "Hi", "max_tokens": 4}
        queued = pool.submit(lambda: httpx.post(server.url + "/v1/completions", json=body, timeout=20))
        assert stopping.wait(20)
        try:  # the thread is still alive, but has given up
            late = httpx.post(server.url + "/v1/completions", json=body, timeout=20)
        finally:
            proceed.set()
        assert error_of(late, 503)["type"] == "service_unavailable"
        err = error_of(queued.result(), 503)
        assert err["type"] == "service_unavailable" and "engine" in err["message"]
        assert wait_for(lambda: not engine._thread.is_alive())
        error_of(server.post("/v1/completions", body), 503)
        assert error_of(httpx.get(server.url + "/health"), 503)["type"] == "service_unavailable"


# --- case 38: a λ whose mix overflows the model's dtype fails its own request only ---------------------------

from test_serve import adapter_dir  # noqa: E402,F401  (the fixture: a perturbed layer adapter)


@pytest.fixture(scope="module")
def fp16_dual_server(model_dirs, adapter_dir):  # noqa: F811
    base = AutoModelForCausalLM.from_pretrained(model_dirs["llama"][0], dtype=torch.float16)
    dual = DualPathModel.from_adapter(base, adapter_dir)
    with Server(HFEngine(dual, load_tokenizer(model_dirs["llama"][0]), 1, max_concurrency=8, max_queue=8),
                lam_range=(-1e6, 1e6)) as server:
        yield server


def _overflow_error(r: httpx.Response) -> None:
    err = error_of(r, 400)
    assert err["param"] == "alignment_strength" and "float16" in err["message"] and "overflow" in err["message"], err


def test_case38_a_lam_whose_mix_overflows_at_prefill_gets_400_naming_lam_and_dtype(fp16_dual_server):
    server = fp16_dual_server
    r = server.post("/v1/completions", {"model": NAME, "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                        "alignment_strength": 1e5})
    _overflow_error(r)
    assert "100000" in r.json()["error"]["message"]
    server.assert_serves(alignment_strength=0.5)
    assert server.metrics()["aligndial_engine_restarts_total"] == 0


def test_case38_a_row_whose_mix_overflows_in_a_decode_step_fails_alone(fp16_dual_server):
    """A λ that survives the prompt but overflows float16 at a later token, decoding beside three
    λ=0.5 requests: it fails alone (400), and the others give exactly their tokens alone."""
    server = fp16_dual_server
    engine = server.engine
    ids = engine.tokenizer(PROMPT)["input_ids"]

    def tokens_then_error(lam):
        events = engine_events(engine, GenerationRequest(ids, 16, [lam], temperature=0))[0]
        return len(events) > 1 and events[-1].finish_reason == "error"

    # λ·|h_aligned − h_base| crosses 65504 at some decode step before it does at the prompt's last position.
    grid = [1000 * 1.1**i for i in range(60)]
    lam = next((x for x in grid if tokens_then_error(x)), None)
    assert lam is not None, "no λ overflows in a decode step only; widen the grid"
    client = server.client()
    alone = [completion_ids(client, PROMPT, 0.5, N) for _ in range(3)]
    start = threading.Barrier(4)

    def send(i):
        start.wait()
        if i == 0:
            return server.post("/v1/completions", {"model": NAME, "prompt": PROMPT, "max_tokens": 16, "temperature": 0,
                                                   "alignment_strength": lam})
        time.sleep(0.05)  # the overflowing row is already in the batch when these join it
        return completion_ids(client, PROMPT, 0.5, N)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(send, range(4)))
    _overflow_error(results[0])
    assert results[1:] == alone
    server.assert_serves(alignment_strength=0.5)


# --- `vllm_xargs` (what clients of `vllm serve` send) is an alias, never silently ignored ------------------


@pytest.fixture(scope="module")
def pair_server(model_dirs):
    ref, aligned, _ = model_dirs["llama"]
    pair = RealignedPair.from_pretrained(ref, aligned)
    with Server(HFEngine(pair, pair.tokenizer, 1, max_concurrency=8, max_queue=8)) as server:
        yield server


def test_vllm_xargs_alignment_strength_is_an_alias_and_bad_values_get_400(pair_server):
    client = pair_server.client()
    for lam in (0.0, 2.0):
        r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                      extra_body={"vllm_xargs": {"alignment_strength": lam}, "return_token_ids": True})
        assert r.model_extra["alignment_strength"] == lam
        assert r.choices[0].model_extra["token_ids"] == completion_ids(client, PROMPT, lam, 8)
    body = {"model": NAME, "prompt": "Hi", "max_tokens": 2}
    for xargs, needle in [({"alignment_strength": "x"}, "`alignment_strength`"), ({"alignment_strength": 1e38}, "within"),
                          ({"alignment_strength": [0.5, 0.5]}, "1 weight"), ({"temperature_schedule": 1}, "vllm_xargs")]:
        err = error_of(pair_server.post("/v1/completions", {**body, "vllm_xargs": xargs}), 400)
        assert needle in err["message"] and err["param"] in ("alignment_strength", "vllm_xargs"), err
    err = error_of(pair_server.post("/v1/completions", {**body, "alignment_strength": 0.5,
                                                        "vllm_xargs": {"alignment_strength": 1.0}}), 400)
    assert "disagree" in err["message"]
    pair_server.assert_serves()
