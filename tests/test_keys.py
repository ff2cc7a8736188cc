"""λ policy per API key (`aligndial serve --keys`, serve/keys.py): the policy parser and the TOML
writer, the sliding-minute limiter (property-tested), and one real server (the `openai` client
over HTTP) with several keys: defaults, 401/403/429 naming the limit and the fix, concurrent load,
the usage log and /metrics, a reload during a streamed request, hostile files on reload. The real
command runs in a subprocess for SIGHUP, and in-process for the one-line errors at start.
"""

import copy
import json
import logging
import os
import signal
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aligndial.cli import main
from aligndial.mixing import LAM_LIMIT
from aligndial.pair import RealignedPair
from aligndial.serve import HFEngine
from aligndial.serve.keys import (KeyMetrics, KeyPolicy, KeyUse, PolicyError, PolicyStore, RateLimiter,
                                  check_request, key_hash, parse_key, parse_policy, read_policy, to_toml)
from test_serve import NAME, PROMPT, Server, cli_server, sse_events, wait_for

KEYS = {name: f"sk-{name}-{'x' * 20}-secret" for name in ("alice", "bob", "carol", "dave", "erin", "grace", "mallory")}
POLICIES = {
    "alice": {"lam_range": [0.0, 1.0], "default_lam": 0.5, "max_tokens": 8, "models": [NAME]},
    "bob": {"lam_range": [1.0, 3.0], "requests_per_minute": 3},
    "carol": {"tokens_per_minute": 20},
    "dave": {}, "erin": {}, "grace": {},
    "mallory": {"models": ["another-model"]},
}


def keys_file_text(names=tuple(POLICIES)) -> str:
    return "\n".join(to_toml(n, {"sha256": key_hash(KEYS[n]), **POLICIES[n]}) for n in names)


def one_line(message: str) -> bool:
    return "\n" not in message.strip()


# --- the parser and the writer -----------------------------------------------------------------------------

GOOD = to_toml("alice", {"sha256": "a" * 64})
HOSTILE = [  # (file text, what the one line must say)
    ("[keys.alice]\nlam_range = [0.0, 1.0]\n", "missing `sha256`"),
    ("[keys.alice]\nsha256 = 12\n", "`sha256` must be 64 hex digits"),
    ("[keys.alice]\nsha256 = \"sk-the-key-itself\"\n", "`sha256` must be 64 hex digits"),
    (GOOD + 'lam_range = "0,1"\n', "`lam_range` must be [LO, HI]"),
    (GOOD + "lam_range = [0.0, 1.0, 2.0]\n", "`lam_range` must be [LO, HI]"),
    (GOOD + "lam_range = [1.0, 0.0]\n", "LO ≤ HI"),
    (GOOD + 'lam_range = [0.0, "1"]\n', "must be a number"),
    (GOOD + "lam_range = [0.0, true]\n", "must be a number"),
    (GOOD + "lam_range = [0.0, nan]\n", "must be a finite number"),
    (GOOD + "lam_range = [0.0, inf]\n", "must be a finite number"),
    (GOOD + f"lam_range = [0.0, {LAM_LIMIT * 10}]\n", f"within [{-LAM_LIMIT:g}, {LAM_LIMIT:g}]"),
    (GOOD + "lam_range = [-6.0, 1.0]\n", "beyond the server's --lam-range [-5, 10]"),
    (GOOD + "lam_range = [0.0, 1.0]\ndefault_lam = 2.0\n", "outside the key's λ range [0, 1]"),
    (GOOD + "default_lam = [0.5, 0.5]\n", "has 2 weight(s) but the server has 1 aligned model(s)"),
    (GOOD + "default_lam = []\n", "`default_lam` must be a number"),
    (GOOD + "requests_per_minute = 0\n", "`requests_per_minute` must be a whole number ≥ 1"),
    (GOOD + "tokens_per_minute = 1.5\n", "`tokens_per_minute` must be a whole number ≥ 1"),
    (GOOD + "max_tokens = true\n", "`max_tokens` must be a whole number ≥ 1"),
    (GOOD + 'models = "tiny"\n', "`models` must be a non-empty list"),
    (GOOD + "models = []\n", "`models` must be a non-empty list"),
    (GOOD + "lam_rnage = [0.0, 1.0]\n", "unknown field 'lam_rnage'"),
    (GOOD + "\n" + GOOD, "Cannot declare ('keys', 'alice') twice"),  # a duplicate name
    (GOOD + "\n" + GOOD.replace("alice", "bob"), "[keys.bob] has the same `sha256` as [keys.alice]"),
    ("[keys]\nalice = 3\n", "[keys.alice] must be a table"),
    ('[keys."al ice"]\nsha256 = "' + "a" * 64 + '"\n', "a key name must be"),
    ("[users.alice]\n", "unknown top-level entry 'users'"),
    ("keys = [1, 2]\n", "`keys` must be tables"),
    ("[keys.alice\n", "not valid TOML"),
]


@pytest.mark.parametrize("text, says", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_policy_files_give_one_line_naming_the_problem(text, says):
    with pytest.raises(PolicyError) as e:
        parse_policy(text, "keys.toml", lam_range=(-5.0, 10.0), n_aligned=1)
    assert says in str(e.value) and one_line(str(e.value)) and str(e.value).startswith("keys.toml")


def test_a_file_that_is_missing_empty_or_not_utf8_gives_one_line(tmp_path):
    for content, says in ((None, "cannot read the keys file"), (b"  \n", "is empty"),
                          (b'[keys.a]\n# caf\xe9\n', "line 2: not UTF-8")):
        path = tmp_path / "keys.toml"
        path.unlink(missing_ok=True)
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(PolicyError, match=says) as e:
            read_policy(str(path))
        assert one_line(str(e.value))


def test_a_good_file_parses_to_its_policies():
    policy = parse_policy(keys_file_text(), "keys.toml", lam_range=(-5.0, 10.0), n_aligned=1)
    alice = next(k for k in policy.keys if k.name == "alice")
    assert (alice.lam_range, alice.default_lam, alice.max_tokens, alice.models) == ((0.0, 1.0), 0.5, 8, (NAME,))
    assert policy.lookup(KEYS["bob"].encode()).name == "bob" and policy.lookup(b"sk-nobody") is None
    # Neither the key nor its hash is in a repr.
    assert key_hash(KEYS["alice"]) not in repr(policy) and KEYS["alice"] not in repr(policy)


names = st.from_regex(r"[A-Za-z0-9_-]{1,20}", fullmatch=True)
finite = st.floats(-LAM_LIMIT, LAM_LIMIT, allow_nan=False)


@st.composite
def key_fields(draw) -> dict:
    lo, hi = sorted(draw(st.tuples(finite, finite)))
    fields = {"sha256": draw(st.from_regex(r"[0-9a-f]{64}", fullmatch=True))}
    if draw(st.booleans()):
        fields["lam_range"] = [lo, hi]
    if draw(st.booleans()):
        fields["default_lam"] = draw(st.floats(lo, hi)) if draw(st.booleans()) else [draw(st.floats(lo, hi))] * 2
    for name in ("requests_per_minute", "tokens_per_minute", "max_tokens"):
        if draw(st.booleans()):
            fields[name] = draw(st.integers(1, 10**12))
    if draw(st.booleans()):
        fields["models"] = draw(st.lists(st.text(min_size=1).filter(lambda s: s.encode("utf-8", "ignore").decode() == s),
                                         min_size=1, max_size=3))
    return fields


@settings(max_examples=200, deadline=None)
@given(names, key_fields())
def test_to_toml_round_trips_through_tomllib(name, fields):
    text = to_toml(name, fields)
    assert tomllib.loads(text) == {"keys": {name: fields}}
    key = parse_key(name, tomllib.loads(text)["keys"][name], "keys.toml")
    assert key.public() == {"name": name, "lam_range": fields.get("lam_range"), "default_lam": fields.get("default_lam"),
                            **{f: fields.get(f) for f in ("requests_per_minute", "tokens_per_minute", "max_tokens",
                                                          "models")}}


def test_keys_add_and_list(tmp_path, capsys):
    path = str(tmp_path / "keys.toml")
    assert main(["keys", "add", path, "--name", "tutor", "--lam-range=1,2", "--default-lam", "1.5",
                 "--requests-per-minute", "60", "--max-tokens", "512", "--models", "a,b", "--json"]) == 0
    added = json.loads(capsys.readouterr().out)
    key = added.pop("key")
    assert added == {"file": path, "name": "tutor", "lam_range": [1.0, 2.0], "default_lam": 1.5, "requests_per_minute": 60,
                     "tokens_per_minute": None, "max_tokens": 512, "models": ["a", "b"]}
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert main(["keys", "add", path, "--name", "notebook"]) == 0
    second = capsys.readouterr().out.splitlines()[-1]
    text = open(path).read()
    assert key not in text and second not in text  # only hashes are stored
    policy = read_policy(path)
    assert policy.lookup(key.encode()).name == "tutor" and policy.lookup(second.encode()).name == "notebook"
    assert main(["keys", "list", path, "--json"]) == 0
    listed = capsys.readouterr().out
    assert [k["name"] for k in json.loads(listed)["keys"]] == ["tutor", "notebook"]
    assert key_hash(key) not in listed and "sha256" not in listed
    assert main(["keys", "list", path]) == 0
    assert "tutor: lam_range=[1.0, 2.0]" in capsys.readouterr().out
    # A name already there, and bad values, are refused with one line; the file is unchanged.
    for argv, says in ((["--name", "tutor"], "already there"), (["--name", "x", "--lam-range=2,1"], "LO ≤ HI"),
                       (["--name", "x", "--lam-range=1,2", "--default-lam", "3"], "outside the key's λ range"),
                       (["--name", "x", "--max-tokens", "0"], "whole number ≥ 1"), (["--name", "a b"], "key name")):
        assert main(["keys", "add", path, *argv]) == 2
        err = capsys.readouterr().err
        assert says in err and one_line(err), err
    assert open(path).read() == text


# --- the limiter ------------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5), st.lists(st.floats(0, 30, allow_nan=False), min_size=1, max_size=60))
def test_sliding_window_never_admits_more_than_the_rate_in_any_minute(limit, gaps):
    limiter, key, now, admitted = RateLimiter(), KeyPolicy("k", "0" * 64, requests_per_minute=limit), 0.0, []
    for gap in gaps:
        now += gap
        refused = limiter.admit(key, now)
        if refused is None:
            admitted.append(now)
        else:
            rate, wait = refused
            assert rate == "requests_per_minute" and 0 < wait <= 60
            # Retrying after the wait is admitted (nothing else arrived meanwhile), and not before.
            assert copy.deepcopy(limiter).admit(key, now + wait + 1e-6) is None
            if wait > 1e-3:
                assert copy.deepcopy(limiter).admit(key, now + wait - 1e-3) is not None
    for t in admitted:  # every sliding minute
        assert sum(t <= u < t + 60 for u in admitted) <= limit
    # Under the rate, nothing is refused: admitted is the greedy schedule.
    expected, now = [], 0.0
    for gap in gaps:
        now += gap
        if sum(now - 60 < u for u in expected) < limit:
            expected.append(now)
    assert admitted == expected


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 1000), st.lists(st.tuples(st.floats(0, 30, allow_nan=False), st.integers(0, 400)), max_size=40))
def test_token_rate_counts_tokens_when_requests_end(limit, requests):
    limiter, key, now = RateLimiter(), KeyPolicy("k", "0" * 64, tokens_per_minute=limit), 0.0
    spent: list[tuple[float, int]] = []
    for gap, tokens in requests:
        now += gap
        used = sum(n for t, n in spent if t > now - 60)
        refused = limiter.admit(key, now)
        assert (refused is None) == (used < limit)
        if refused is None:
            limiter.spent("k", tokens, now)
            spent.append((now, tokens))
        else:
            wait = refused[1]
            assert 0 < wait <= 60
            assert copy.deepcopy(limiter).admit(key, now + wait + 1e-6) is None  # by then, under the rate
            if wait > 1e-3:
                assert copy.deepcopy(limiter).admit(key, now + wait - 1e-3) is not None


def test_check_request_checks_every_weight_of_lists_and_schedules():
    use, metrics = KeyUse(KeyPolicy("tutor", "0" * 64, lam_range=(1.0, 2.0), models=("m",))), KeyMetrics()
    check_request(use, metrics, "m", [[1.0, 1.5], [2.0, 1.0]], "alignment_strength", None)  # per-turn × multi-aligned
    for lam in ([[1.0, 1.5], [2.5, 1.0]], [1.0, 0.5], 0.99):
        with pytest.raises(Exception, match=r"within \[1, 2\]") as e:
            check_request(use, metrics, "m", lam, "alignment_strength", None)
        assert e.value.status == 403
    with pytest.raises(Exception, match="may not use model 'other'"):
        check_request(use, metrics, "other", 1.0, "alignment_strength", None)
    assert metrics.rejections == {("tutor", "lam_range"): 3, ("tutor", "model"): 1}


# --- one server, seven keys ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(model_dirs, tmp_path_factory):
    """A pair served with --keys (the file above) and --usage-log; `slow` makes each forward sleep."""
    ref, aligned, _ = model_dirs["llama"]
    root = tmp_path_factory.mktemp("keys")
    keys_path, usage = root / "keys.toml", root / "usage.jsonl"
    keys_path.write_text(keys_file_text())
    pair = RealignedPair.from_pretrained(ref, aligned)
    slow = threading.Event()
    pair.members[0].register_forward_pre_hook(lambda module, args: time.sleep(0.02) if slow.is_set() else None)
    store = PolicyStore(str(keys_path), (-5.0, 10.0), 1)
    with Server(HFEngine(pair, pair.tokenizer, 1, max_concurrency=8, max_queue=32), keys=store,
                usage_log=str(usage)) as server:
        server.keys_path, server.usage, server.slow, server.store = keys_path, usage, slow, store
        yield server


def client(server, name: str) -> openai.OpenAI:
    return server.client(api_key=KEYS[name])


def complete(server, name: str, lam=None, **kw):
    extra = {"return_token_ids": True, **({} if lam is None else {"alignment_strength": lam})}
    return client(server, name).completions.create(model=NAME, prompt=kw.pop("prompt", PROMPT), temperature=0,
                                                   max_tokens=kw.pop("max_tokens", 6), extra_body=extra, **kw)


def usage_rows(server) -> list[dict]:
    return [json.loads(line) for line in server.usage.read_text().splitlines()]


def test_three_keys_under_concurrent_load_each_get_their_own_policy(keyed):
    before = keyed.metrics()
    lines_before = len(usage_rows(keyed))
    jobs = [("alice", None), ("dave", 2.0), ("erin", 0.0), ("alice", 1.0), ("dave", None), ("erin", 0.5)] * 3
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda job: complete(keyed, *job), jobs))
    alone = {job: complete(keyed, *job).choices[0].model_extra["token_ids"] for job in set(jobs)}
    for (name, lam), r in zip(jobs, got):
        # alice's default is her key's (0.5); the others get the server's (1.0).
        assert r.alignment_strength == (lam if lam is not None else 0.5 if name == "alice" else 1.0)
        assert r.choices[0].model_extra["token_ids"] == alone[(name, lam)]
    assert alone[("alice", None)] == complete(keyed, "dave", 0.5).choices[0].model_extra["token_ids"]
    after = keyed.metrics()
    for name in ("alice", "dave", "erin"):
        label = f'{{key="{name}"}}'
        sent = sum(j[0] == name for j in jobs) + sum(j[0] == name for j in alone) + (name == "dave")
        assert after[f"aligndial_key_requests_total{label}"] - before.get(f"aligndial_key_requests_total{label}", 0) == sent
    rows = usage_rows(keyed)[lines_before:]
    assert len(rows) == len(jobs) + len(alone) + 1
    by_key = {name: [r for r in rows if r["key"] == name] for name in ("alice", "dave", "erin")}
    assert all(r["status"] == 200 and r["model"] == NAME and r["completion_tokens"] >= 1 and r["latency_s"] > 0
               for rs in by_key.values() for r in rs)
    assert {r["lam"] for r in by_key["alice"]} == {0.5, 1.0}
    completion = sum(r.usage.completion_tokens for (n, _), r in zip(jobs, got) if n == "erin")
    assert completion <= sum(r["completion_tokens"] for r in by_key["erin"])


def test_default_lam_max_tokens_cap_and_403s_name_the_limit_and_the_fix(keyed):
    r = complete(keyed, "alice", max_tokens=None)  # no max_tokens: alice's cap of 8 applies
    assert r.alignment_strength == 0.5 and r.usage.completion_tokens <= 8
    for lam, says in ((1.5, r"allows `alignment_strength` within \[0, 1\].*got 1.5.*wider `lam_range`"),
                      ([1.5], r"within \[0, 1\]"), (-0.5, r"within \[0, 1\]")):
        with pytest.raises(openai.PermissionDeniedError, match=says) as e:
            complete(keyed, "alice", lam)
        assert (e.value.body["param"], e.value.body["code"]) == ("alignment_strength", "lam_range")
    with pytest.raises(openai.PermissionDeniedError, match=r"`lam` within \[0, 1\]"):
        client(keyed, "alice").completions.create(model=NAME, prompt=PROMPT, max_tokens=2, extra_body={"lam": 2.0})
    with pytest.raises(openai.PermissionDeniedError, match="at most 8 tokens per request; got `max_tokens` 9"):
        complete(keyed, "alice", max_tokens=9)
    with pytest.raises(openai.PermissionDeniedError, match="may not use model 'tiny'; it may use 'another-model'"):
        complete(keyed, "mallory")
    # The server's own range still gives 400; chat is checked too.
    with pytest.raises(openai.BadRequestError, match=r"\[-5.0, 10.0\]"):
        complete(keyed, "dave", 11.0)
    with pytest.raises(openai.PermissionDeniedError, match=r"within \[0, 1\]"):
        client(keyed, "alice").chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}],
                                                        max_tokens=2, extra_body={"alignment_strength": 3.0})
    metrics = keyed.metrics()
    assert metrics['aligndial_key_rejections_total{key="alice",reason="lam_range"}'] >= 4
    assert metrics['aligndial_key_rejections_total{key="alice",reason="max_tokens"}'] >= 1
    assert metrics['aligndial_key_rejections_total{key="mallory",reason="model"}'] >= 1
    assert complete(keyed, "alice", 1.0).usage.completion_tokens >= 1  # the next valid request succeeds
    assert [r["status"] for r in usage_rows(keyed) if r["key"] == "mallory"][-1] == 403


def test_missing_or_unknown_keys_get_401_and_health_stays_open(keyed):
    for key in ("", "sk-not-a-key", KEYS["alice"] + "x"):
        r = httpx.post(keyed.url + "/v1/completions", json={"prompt": "Hi"}, timeout=10,
                       headers={"authorization": f"Bearer {key}"} if key else {})
        assert r.status_code == 401, r.text
        err = r.json()["error"]
        assert err["code"] == "invalid_api_key" and "Authorization: Bearer <key>" in err["message"]
        assert (key or "no-key") not in r.text
    with pytest.raises(openai.AuthenticationError, match="unknown API key"):
        openai.OpenAI(base_url=keyed.url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert httpx.get(keyed.url + "/health").status_code == 200
    assert httpx.get(keyed.url + "/playground/config").json()["api_key_required"] is True
    metrics = keyed.metrics()
    assert metrics['aligndial_key_rejections_total{key="-",reason="missing_key"}'] >= 1
    assert metrics['aligndial_key_rejections_total{key="-",reason="unknown_key"}'] >= 2
    assert complete(keyed, "dave").usage.completion_tokens >= 1


def test_request_and_token_rates_give_429_with_retry_after(keyed):
    for _ in range(3):
        complete(keyed, "bob", 2.0, max_tokens=2)
    with pytest.raises(openai.RateLimitError, match=r"key 'bob' is over its rate of 3 requests per minute; retry "
                                                    r"after \d+ s .*`requests_per_minute`") as e:
        complete(keyed, "bob", 2.0, max_tokens=2)
    assert 1 <= int(e.value.response.headers["retry-after"]) <= 60
    # carol: tokens count when a request ends, so her first request may overshoot; the next waits.
    r = complete(keyed, "carol", prompt="The quick brown fox jumps over the lazy dog. " * 4, max_tokens=2)
    assert r.usage.prompt_tokens > 20
    with pytest.raises(openai.RateLimitError, match=r"over its rate of 20 tokens \(prompt \+ completion\) per minute") as e:
        complete(keyed, "carol")
    assert 1 <= int(e.value.response.headers["retry-after"]) <= 60
    metrics = keyed.metrics()
    assert metrics['aligndial_key_rejections_total{key="bob",reason="requests_per_minute"}'] == 1
    assert metrics['aligndial_key_rejections_total{key="carol",reason="tokens_per_minute"}'] == 1
    assert metrics['aligndial_key_prompt_tokens_total{key="carol"}'] + \
        metrics['aligndial_key_completion_tokens_total{key="carol"}'] == r.usage.total_tokens
    # Other keys are not affected; GETs are not rate-limited.
    assert client(keyed, "bob").models.list().data[0].id == NAME
    assert complete(keyed, "erin").usage.completion_tokens >= 1
    assert [r["status"] for r in usage_rows(keyed) if r["key"] == "bob"][-1] == 429


def test_policy_endpoint_gives_the_keys_range_for_the_playground(keyed):
    got = httpx.get(keyed.url + "/v1/policy", headers={"authorization": f"Bearer {KEYS['alice']}"}).json()
    assert (got["name"], got["lam_range"], got["default_lam"], got["max_tokens"]) == ("alice", [0.0, 1.0], 0.5, 8)
    got = httpx.get(keyed.url + "/v1/policy", headers={"authorization": f"Bearer {KEYS['dave']}"}).json()
    assert (got["name"], got["lam_range"], got["default_lam"]) == ("dave", [-5.0, 10.0], 1.0)
    assert "sha256" not in json.dumps(got)


def test_reload_during_a_streamed_request_and_hostile_reloads_keep_the_old_policy(keyed, caplog):
    caplog.set_level(logging.INFO, logger="aligndial.serve")
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 40, "stream": True, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "alignment_strength": 0.7}
    keyed.slow.set()
    try:
        with httpx.stream("POST", keyed.url + "/v1/completions", json=body, timeout=60,
                          headers={"authorization": f"Bearer {KEYS['grace']}"}) as stream:
            lines = stream.iter_lines()
            head = sse_events([next(line for line in lines if line.startswith("data: "))])
            # grace is removed and alice narrowed, while grace's stream runs.
            POLICIES_NOW = {**POLICIES, "alice": {**POLICIES["alice"], "lam_range": [0.25, 1.0]}}
            text = "\n".join(to_toml(n, {"sha256": key_hash(KEYS[n]), **POLICIES_NOW[n]})
                             for n in POLICIES_NOW if n != "grace")
            tmp = keyed.keys_path.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, keyed.keys_path)
            with pytest.raises(openai.AuthenticationError):
                complete(keyed, "grace")
            with pytest.raises(openai.PermissionDeniedError, match=r"within \[0.25, 1\]"):
                complete(keyed, "alice", 0.0)
            events = sse_events(lines)
    finally:
        keyed.slow.clear()
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] is not None
    streamed = sum(len(e["choices"][0]["token_ids"]) for e in head + events[:-1])
    assert streamed >= 1 and all(e.get("alignment_strength") == 0.7 for e in head + events[:-1])
    row = [r for r in usage_rows(keyed) if r["key"] == "grace"][-1]
    assert (row["status"], row["completion_tokens"], row["lam"]) == (200, streamed, 0.7)
    assert any("reloaded (file changed)" in r.getMessage() for r in caplog.records)

    # Hostile files on reload: each keeps the policy in force, with one log line saying why.
    good = keyed.keys_path.read_text()
    for bad, says in [("[keys.alice]\nsha256 = 5\n", "64 hex digits"), (good + "\n" + good, "twice"),
                      (good.replace("lam_range = [0.25, 1.0]", "lam_range = [0.25, 1e300]"), "must be within"),
                      (good.replace("max_tokens = 8", 'max_tokens = "8"'), "whole number"),
                      (good.replace("lam_range = [0.25, 1.0]", "lam_range = [-9.0, 1.0]"), "beyond the server's")]:
        errors_before = keyed.metrics()['aligndial_keys_reloads_total{result="error"}']
        caplog.clear()
        keyed.keys_path.write_text(bad)
        os.utime(keyed.keys_path, ns=(time.time_ns(), time.time_ns()))
        with pytest.raises(openai.PermissionDeniedError, match=r"within \[0.25, 1\]"):  # the old policy
            complete(keyed, "alice", 0.0)
        assert keyed.metrics()['aligndial_keys_reloads_total{result="error"}'] == errors_before + 1
        lines_logged = [r.getMessage() for r in caplog.records if "not reloaded" in r.getMessage()]
        assert len(lines_logged) == 1 and says in lines_logged[0] and one_line(lines_logged[0])
    keyed.keys_path.write_text(keys_file_text())  # back to the module's file
    assert complete(keyed, "grace").usage.completion_tokens >= 1


def test_a_client_that_leaves_mid_stream_is_logged_as_499(keyed):
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 60, "stream": True, "temperature": 0}
    keyed.slow.set()
    try:
        with httpx.stream("POST", keyed.url + "/v1/completions", json=body, timeout=60,
                          headers={"authorization": f"Bearer {KEYS['erin']}"}) as stream:
            next(line for line in stream.iter_lines() if line.startswith("data: "))
        assert wait_for(lambda: usage_rows(keyed)[-1]["status"] == 499, 10), usage_rows(keyed)[-1]
    finally:
        keyed.slow.clear()
    row = usage_rows(keyed)[-1]
    assert row["key"] == "erin" and row["completion_tokens"] < 60
    assert complete(keyed, "erin").usage.completion_tokens >= 1


def test_keys_never_appear_in_logs_metrics_errors_or_reprs(keyed, caplog):
    caplog.set_level(logging.DEBUG)
    complete(keyed, "dave")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEYS["dave"] + "-wrong", max_retries=0).models.list()
    seen = "\n".join([caplog.text, httpx.get(keyed.url + "/metrics").text, keyed.usage.read_text(),
                      repr(keyed.settings), repr(keyed.store), repr(keyed.store.policy)])
    for key in KEYS.values():
        assert key not in seen and key_hash(key) not in seen
    assert "alice" in seen


# --- the command -------------------------------------------------------------------------------------------------


def test_serve_checks_the_keys_file_before_loading_a_model(model_dirs, tmp_path, capsys, monkeypatch):
    ref, aligned, _ = model_dirs["llama"]
    bad = tmp_path / "keys.toml"
    bad.write_text("[keys.alice]\nlam_range = [0.0, 1.0]\n")
    loaded = []
    monkeypatch.setattr(RealignedPair, "from_pretrained", lambda *a, **k: loaded.append(1))
    base = ["serve", "--ref", ref, "--aligned", aligned]
    for argv, says in (([*base, "--keys", str(bad)], "missing `sha256`"),
                       ([*base, "--keys", str(tmp_path / "none.toml")], "cannot read the keys file"),
                       ([*base, "--keys", str(bad), "--api-key", "k"], "`--keys` and `--api-key` exclude each other"),
                       ([*base, "--usage-log", str(tmp_path / "no" / "u.jsonl")], "cannot append")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert says in err and one_line(err), err
    bad.write_text(to_toml("alice", {"sha256": "a" * 64, "lam_range": [0.0, 4.0]}))
    assert main([*base, "--keys", str(bad), "--lam-range=0,3"]) == 2
    assert "beyond the server's --lam-range [0, 3]" in capsys.readouterr().err
    monkeypatch.setenv("ALIGNDIAL_API_KEY", "k")
    assert main([*base, "--keys", str(bad)]) == 2
    assert "ALIGNDIAL_API_KEY" in capsys.readouterr().err
    assert loaded == []


def test_cli_server_reloads_on_sighup_and_the_usage_log_survives_a_kill(model_dirs, tmp_path, capsys):
    ref, aligned, _ = model_dirs["llama"]
    keys_path, usage = str(tmp_path / "keys.toml"), str(tmp_path / "usage.jsonl")
    assert main(["keys", "add", keys_path, "--name", "first", "--lam-range=0,1"]) == 0
    first = capsys.readouterr().out.splitlines()[-1]
    with cli_server(["--ref", ref, "--aligned", aligned, "--keys", keys_path, "--usage-log", usage],
                    tmp_path / "server.log") as (proc, url):
        one = openai.OpenAI(base_url=url + "/v1", api_key=first, max_retries=0, timeout=60)
        name = one.models.list().data[0].id
        assert one.completions.create(model=name, prompt=PROMPT, max_tokens=3).alignment_strength == 1.0
        # A key added while the server runs works after SIGHUP (the log says it was SIGHUP).
        assert main(["keys", "add", keys_path, "--name", "second", "--default-lam", "0.25"]) == 0
        second = capsys.readouterr().out.splitlines()[-1]
        proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "reloaded (SIGHUP)" in open(tmp_path / "server.log").read(), 10)
        two = openai.OpenAI(base_url=url + "/v1", api_key=second, max_retries=0, timeout=60)
        assert two.completions.create(model=name, prompt=PROMPT, max_tokens=3).alignment_strength == 0.25
        proc.kill()  # no shutdown: every finished request's line is already on disk
        proc.wait(10)
    rows = [json.loads(line) for line in open(usage)]
    assert [(r["key"], r["status"], r["lam"]) for r in rows] == [("first", 200, 1.0), ("second", 200, 0.25)]
    output = open(tmp_path / "server.log").read()
    assert first not in output and second not in output and "2 key(s)" in output
