"""The playground at ``GET /`` driven in a real headless browser (Debian's chromium + chromedriver through selenium;
nothing is downloaded at test time), against ``dscoder serve`` on the tiny checkpoint; and ``GET /props``."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

KEY = "page-key"
NAME = "tiny-coder"
MAX_LEN = 256
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver; .ci/run "
           "installs them)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    """``dscoder serve`` in its own process, as a user starts it, with an API key."""
    port = _free_port()
    log = (tmp_path_factory.mktemp("page") / "serve.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "dscoder.cli", "serve", "--model", str(tiny_checkpoint),
                             "--port", str(port), "--api-key", KEY, "--served-model-name", NAME,
                             "--max-len", str(MAX_LEN), "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"dscoder serve did not come up (exit {proc.poll()}):\n{log.read()}")
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _request(url, path, body=None, key=KEY):
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url + path, data=data, headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def test_page_is_open_and_self_contained(server):
    status, headers, html = _request(server, "/", key=None)
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in headers["content-security-policy"]  # the browser refuses any other origin
    assert not re.search(r"(?i)\b(src|href)\s*=|https?://", html)  # one file: no script, style or link elsewhere
    assert len(html) < 20_000
    for path in ("/v1/models", "/props"):  # the routes the page calls still need the key
        assert _request(server, path, key=None)[0] == 401


def test_props_reports_the_served_model(server):
    status, _, body = _request(server, "/props")
    props = json.loads(body)
    assert status == 200 and props["model"] == NAME and props["n_ctx"] == MAX_LEN and props["fim"] is True
    assert props["fim_warning"] is None  # a Base-style name
    assert props["parameters"] > props["activated_parameters"] > 0  # the tiny preset is a MoE
    assert props["architecture"]["routed_experts"] > props["architecture"]["experts_per_token"] > 0
    assert props["dtype"] == "float32" and props["device"] == "cpu"


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--window-size=1280,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # paths given: no driver download
    yield driver
    driver.quit()


def _text(driver, css):
    """An element's textContent as the page set it (Selenium's .text trims and drops hidden text)."""
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
                                 css)


def _run_and_wait(driver, button, readout):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.ID, button).click()
    WebDriverWait(driver, 30, poll_frequency=0.05).until(
        lambda d: d.find_element(By.ID, readout).get_attribute("data-state") in ("done", "error", "stopped"))
    assert driver.find_element(By.ID, readout).get_attribute("data-state") == "done", _text(driver, "#" + readout)
    return _text(driver, "#" + readout)


def _readout_numbers(readout: str) -> tuple[int, float]:
    m = re.match(r"(\d+) tokens · (\d+(?:\.\d+)?) tok/s · first token after \d+ ms", readout)
    assert m, readout
    return int(m[1]), float(m[2])


@needs_browser
def test_playground_chat_and_fim_in_a_browser(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server + "/")
    # the facts call answers 401 without a key, so the page shows its key field; entering the key loads the facts
    WebDriverWait(browser, 10, poll_frequency=0.05).until(lambda d: d.find_element(By.ID, "key-row").is_displayed())
    browser.find_element(By.ID, "api-key").send_keys(KEY + Keys.ENTER)
    WebDriverWait(browser, 10, poll_frequency=0.05).until(lambda d: NAME in _text(d, "#facts")
                                                          and "parameters" in _text(d, "#facts"))
    assert f"context {MAX_LEN} tokens" in _text(browser, "#facts")
    max_tokens = browser.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("16")

    # chat: the streamed answer the page shows is the server's greedy answer, token count included
    browser.find_element(By.ID, "chat-input").send_keys("write a sort")
    readout = _run_and_wait(browser, "chat-send", "chat-readout")
    shown = _text(browser, "#chat-log .msg.assistant")
    _, _, body = _request(server, "/v1/chat/completions", {"model": NAME, "max_tokens": 16, "temperature": 0,
                                                          "messages": [{"role": "user", "content": "write a sort"}]})
    ref = json.loads(body)
    assert shown and shown == ref["choices"][0]["message"]["content"]
    tokens, rate = _readout_numbers(readout)
    assert tokens == ref["usage"]["completion_tokens"] and rate > 0

    # FIM: prefix and suffix panes, the middle streamed between them
    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    for field, text in (("fim-prefix", prefix), ("fim-suffix", suffix)):
        el = browser.find_element(By.ID, field)
        el.clear()
        el.send_keys(text)
    readout = _run_and_wait(browser, "fim-send", "fim-readout")
    middle = _text(browser, "#fim-middle")
    _, _, body = _request(server, "/v1/completions", {"model": NAME, "prompt": prefix, "suffix": suffix,
                                                      "max_tokens": 16, "temperature": 0})
    ref = json.loads(body)
    assert middle and middle == ref["choices"][0]["text"]
    assert _text(browser, "#fim-output") == prefix + middle + suffix
    tokens, rate = _readout_numbers(readout)
    assert tokens == ref["usage"]["completion_tokens"] and rate > 0

    # no script error and no blocked request on the page (the first facts call's 401 is expected)
    errors = [e["message"] for e in browser.get_log("browser")
              if e["level"] == "SEVERE" and "401" not in e["message"]]
    assert not errors, errors
