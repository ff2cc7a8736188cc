"""The playground page (serve/static/) in headless Chromium, against a real server on tiny models.

Compare mode streams λ=0 and λ=2 side by side; each column must update while it streams, and end
with the text (and token count) that the API returns for its λ with greedy decoding. The same
flow runs in chat mode against a server that requires an API key, typed into the page. The
page's own curl and Python snippets are run too, and must print the same text.

Needs Debian's `chromium` and `chromium-driver`. Without them the tests are skipped, unless
ALIGNDIAL_REQUIRE_BROWSER=1 (as .ci/run sets), where they fail. Screenshots: tests/artifacts/.
"""

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from aligndial.pair import RealignedPair
from aligndial.serve import HFEngine
from test_serve import NAME, Server

ARTIFACTS = Path(__file__).parent / "artifacts"
KEY = "playground-key-7"
LAM_RANGE = (-1.0, 3.0)
PROMPT, SYSTEM, MAX_TOKENS = "The quick brown fox", "Answer briefly.", 32
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,900"]

# What each column shows: [text, token count].
COLUMNS = """return [...document.querySelectorAll(".column")].map(
    (c) => [c.querySelector(".output").textContent, Number(c.querySelector(".tokens").textContent)]);"""
# Records COLUMNS after every change to the outputs, so that the test sees the stream as it comes.
RECORD_UPDATES = f"""window.updates = [];
new MutationObserver(() => window.updates.push((() => {{ {COLUMNS} }})()))
  .observe(document.getElementById("outputs"), {{subtree: true, childList: true, characterData: true}});"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        reason = "needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)"
        if os.environ.get("ALIGNDIAL_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + "; ALIGNDIAL_REQUIRE_BROWSER=1 forbids skipping")
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager (which would download a driver) never runs.
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    yield driver
    driver.quit()


def find(browser, css: str):
    return browser.find_element(By.CSS_SELECTOR, css)


def set_number(field, value: str) -> None:
    field.clear()
    field.send_keys(value)


def open_page(browser, server, max_tokens: int) -> None:
    browser.get(server.url + "/")
    WebDriverWait(browser, 10).until(lambda _: find(browser, ".column"))
    find(browser, "#prompt").send_keys(PROMPT)
    set_number(find(browser, "#max-tokens"), str(max_tokens))
    set_number(find(browser, "#temperature"), "0")


def run(browser) -> list[list]:
    """Click Run, wait until every column is done; returns COLUMNS."""
    find(browser, "#run").click()
    WebDriverWait(browser, 60).until(lambda _: find(browser, "#status").text.startswith("Done"))
    return browser.execute_script(COLUMNS)


def save_full_page(browser, path: Path) -> None:
    """A screenshot of the whole page, not only the window (Chrome DevTools Protocol)."""
    size = browser.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {"captureBeyondViewport": True, "clip": clip})
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))


@pytest.mark.slow
@pytest.mark.parametrize("chat, api_key", [(False, None), (True, KEY)], ids=["completion", "chat-with-key"])
def test_compare_streams_each_lam_and_matches_the_api(browser, model_dirs, chat, api_key):
    ref, aligned, _ = model_dirs["llama"]
    pair = RealignedPair.from_pretrained(ref, aligned)
    engine = HFEngine(pair, pair.tokenizer, 1, max_concurrency=4, max_queue=4)
    with Server(engine, lam_range=LAM_RANGE, api_key=api_key) as server:
        # The page, its files and its config are served without a key; the API is not.
        for path in ("/", "/playground", "/static/app.js", "/static/style.css", "/playground/config"):
            assert httpx.get(server.url + path).status_code == 200, path
        assert httpx.get(server.url + "/v1/models").status_code == (401 if api_key else 200)

        open_page(browser, server, MAX_TOKENS)
        if chat:
            find(browser, "input[name=mode][value=chat]").click()
            find(browser, "#system").send_keys(SYSTEM)
        Select(find(browser, "#columns")).select_by_value("2")
        ranges = browser.find_elements(By.CSS_SELECTOR, ".column input[type=range]")
        numbers = browser.find_elements(By.CSS_SELECTOR, ".column input[type=number]")
        assert len(ranges) == len(numbers) == 2
        # The slider's bounds are the server's --lam-range, and the keyboard moves it.
        assert (ranges[1].get_attribute("min"), ranges[1].get_attribute("max")) == ("-1", "3")
        ranges[1].send_keys(Keys.END)
        assert numbers[1].get_property("value") == "3"
        for number, slider, lam in zip(numbers, ranges, ("0", "2")):
            set_number(number, lam)
            assert slider.get_property("value") == lam

        if api_key:  # without the key, the page shows the server's 401 message
            find(browser, "#run").click()
            WebDriverWait(browser, 10).until(lambda _: "API key" in find(browser, "#status").text)
            find(browser, "#api-key").send_keys(api_key)
        browser.execute_script(RECORD_UPDATES)
        shown = run(browser)
        updates = browser.execute_script("return window.updates;")

        client = server.client(api_key=api_key or "unused")
        for i, lam in enumerate((0, 2)):
            kw = dict(model=NAME, max_tokens=MAX_TOKENS, temperature=0, extra_body={"alignment_strength": lam})
            if chat:
                r = client.chat.completions.create(
                    messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}], **kw)
                expected = r.choices[0].message.content
            else:
                r = client.completions.create(prompt=PROMPT, **kw)
                expected = r.choices[0].text
            assert shown[i] == [expected, r.usage.completion_tokens], f"column {i + 1} (λ={lam})"
            partial = [u[i] for u in updates if 0 < len(u[i][0]) < len(expected) and 0 < u[i][1] < shown[i][1]]
            assert partial and all(expected.startswith(text) for text, _ in partial), f"column {i + 1} did not stream"
        assert shown[0][0] != shown[1][0]  # λ matters on these models

        # The key was held in memory only.
        assert browser.execute_script("return [localStorage.length, sessionStorage.length, document.cookie]") == [0, 0, ""]
        save_full_page(browser, ARTIFACTS / f"playground-{'chat' if chat else 'completion'}.png")

        # The page's code for column 2 makes the same call: run its Python and its curl.
        browser.find_elements(By.CSS_SELECTOR, ".show-code")[1].click()
        python_code, curl_code = (find(browser, css).get_property("textContent") for css in ("#python-code", "#curl-code"))
        assert 'extra_body={"alignment_strength": 2}' in python_code
        env = {**os.environ, "ALIGNDIAL_API_KEY": api_key or "", "PYTHONIOENCODING": "utf-8"}
        printed = subprocess.run([sys.executable, "-c", python_code], env=env, capture_output=True, check=True).stdout
        assert printed.decode() == shown[1][0] + "\n"
        reply = json.loads(subprocess.run(["bash", "-c", curl_code + " --silent"], env=env, capture_output=True,
                                          check=True).stdout)["choices"][0]
        assert (reply["message"]["content"] if chat else reply["text"]) == shown[1][0]


@pytest.mark.slow
def test_two_aligned_models_give_one_slider_per_weight(browser, model_dirs):
    ref, aligned, aligned2 = model_dirs["llama"]
    pair = RealignedPair.from_pretrained(ref, [aligned, aligned2])
    engine = HFEngine(pair, pair.tokenizer, 2, max_concurrency=4, max_queue=4)
    with Server(engine, default_lam=[0.5, 0.5]) as server:
        open_page(browser, server, 8)
        labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".column .lam label")]
        numbers = browser.find_elements(By.CSS_SELECTOR, ".column input[type=number]")
        assert labels == ["λ1", "λ2"] and [n.get_property("value") for n in numbers] == ["0.5", "0.5"]
        for number, weight in zip(numbers, ("1", "0.25")):
            set_number(number, weight)
        [shown] = run(browser)
        r = server.client().completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                               extra_body={"alignment_strength": [1, 0.25]})
        assert shown == [r.choices[0].text, r.usage.completion_tokens]
        assert '"alignment_strength": [1, 0.25]' in find(browser, "#python-code").get_property("textContent")


@pytest.mark.slow
def test_a_key_from_a_keys_file_sets_the_sliders_range_and_default(browser, model_dirs, tmp_path):
    """`serve --keys`: once a key is typed, the slider spans that key's λ range, starts at its
    default, and a run is answered under its policy."""
    from aligndial.serve.keys import PolicyStore, key_hash, to_toml

    key = "sk-tutor-key-for-the-page"
    path = tmp_path / "keys.toml"
    path.write_text(to_toml("tutor", {"sha256": key_hash(key), "lam_range": [1.0, 2.0], "default_lam": 1.5}))
    ref, aligned, _ = model_dirs["llama"]
    pair = RealignedPair.from_pretrained(ref, aligned)
    engine = HFEngine(pair, pair.tokenizer, 1, max_concurrency=4, max_queue=4)
    with Server(engine, lam_range=LAM_RANGE, keys=PolicyStore(str(path), LAM_RANGE, 1)) as server:
        open_page(browser, server, 8)
        slider = find(browser, ".column input[type=range]")
        assert (slider.get_attribute("min"), slider.get_attribute("max")) == ("-1", "3")  # the server's, before a key
        find(browser, "#api-key").send_keys(key, Keys.TAB)
        WebDriverWait(browser, 10).until(lambda _: slider.get_attribute("min") == "1")
        assert (slider.get_attribute("max"), slider.get_property("value")) == ("2", "1.5")
        assert "key tutor: λ from 1 to 2" in find(browser, "#server-info").text
        [shown] = run(browser)
        r = server.client(api_key=key).completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0)
        assert r.alignment_strength == 1.5 and shown == [r.choices[0].text, r.usage.completion_tokens]
        assert key not in find(browser, "body").text
