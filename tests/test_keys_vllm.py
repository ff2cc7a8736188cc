"""`aligndial serve --engine vllm --keys`: the same key policies, checked before a request reaches
vLLM (one server: vLLM starts slowly). The engine's prefill counter in /metrics shows what vLLM
received: refused requests never arrive."""

import sys

import httpx
import openai
import pytest

from aligndial.serve.keys import key_hash, to_toml
from vllm_helpers import PROMPTS, Subprocess, perturbed_adapter, tiny

pytestmark = pytest.mark.slow

KEYS = {"tutor": "sk-tutor-vllm-key", "notebook": "sk-notebook-vllm-key"}


def prefills(server) -> float:
    lines = httpx.get(server.url + "/metrics", timeout=10).text.splitlines()
    return next(float(line.split()[-1]) for line in lines if line.startswith("aligndial_prefills_total"))


def test_policies_are_checked_before_the_vllm_engine(tok, tmp_path):
    ref = tiny("llama", tok, 0, tmp_path, "ref")
    adapter = perturbed_adapter(ref, tmp_path)
    keys = tmp_path / "keys.toml"
    keys.write_text(to_toml("tutor", {"sha256": key_hash(KEYS["tutor"]), "lam_range": [1.0, 2.0], "default_lam": 1.5,
                                      "max_tokens": 4, "requests_per_minute": 3})
                    + to_toml("notebook", {"sha256": key_hash(KEYS["notebook"])}))
    server = Subprocess([sys.executable, "-m", "aligndial.cli", "serve", "--engine", "vllm", "--model", ref, "--adapter",
                         adapter, "--lam-range=-2,3", "--enforce-eager", "--keys", str(keys)], tmp_path / "serve.log")
    try:
        tutor, notebook = (openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS[k], max_retries=0, timeout=120)
                           for k in ("tutor", "notebook"))
        model = notebook.models.list().data[0].id
        r = tutor.completions.create(model=model, prompt=PROMPTS[0], temperature=0)  # 1 of tutor's 3 requests
        assert r.alignment_strength == 1.5 and 1 <= r.usage.completion_tokens <= 4  # its default λ and its cap
        assert notebook.completions.create(model=model, prompt=PROMPTS[0], max_tokens=4, temperature=0,
                                           extra_body={"alignment_strength": -1.5}).alignment_strength == -1.5
        seen = prefills(server)
        assert seen == 2
        with pytest.raises(openai.PermissionDeniedError, match=r"key 'tutor' allows `alignment_strength` within \[1, 2\]"):
            tutor.completions.create(model=model, prompt=PROMPTS[0], extra_body={"alignment_strength": 0.0})
        with pytest.raises(openai.PermissionDeniedError, match="at most 4 tokens per request"):
            tutor.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
        with pytest.raises(openai.RateLimitError, match="3 requests per minute") as e:
            tutor.completions.create(model=model, prompt=PROMPTS[0], max_tokens=2)
        assert int(e.value.response.headers["retry-after"]) >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="sk-unknown", max_retries=0).completions.create(
                model=model, prompt=PROMPTS[0])
        assert prefills(server) == seen  # none of the refused requests reached vLLM
        assert notebook.completions.create(model=model, prompt=PROMPTS[1], max_tokens=2).usage.completion_tokens >= 1
        assert prefills(server) == seen + 1
    finally:
        server.stop()
    assert KEYS["tutor"] not in server.output() and KEYS["notebook"] not in server.output()
