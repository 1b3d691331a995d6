"""The OpenAI-compatible server, checked with the official ``openai`` client against uvicorn on a free port."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from dscoder.engine import Engine  # noqa: E402
from dscoder.serve import Limits, create_app  # noqa: E402
from conftest import make_checkpoint  # noqa: E402

KEY = "test-key"
NAME = "tiny-coder"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("serve_ckpt"))
    engine = Engine(ckpt, max_batch_size=8, max_len=128)
    limits = Limits(max_tokens=64, max_concurrent=48)
    app = create_app(engine, model_name=NAME, api_key=KEY, limits=limits)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield {"url": f"http://127.0.0.1:{port}", "engine": engine, "limits": limits}
    srv.should_exit = True
    thread.join(timeout=10)
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _post(server, path, body, key=KEY, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(server["url"] + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_health_and_models(server, client):
    with urllib.request.urlopen(server["url"] + "/health", timeout=10) as r:
        assert json.loads(r.read()) == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == [NAME]


def test_completion_matches_engine(server, client):
    ref = server["engine"].generate("def f(x):", max_tokens=12, ignore_eos=True)
    out = client.completions.create(model=NAME, prompt="def f(x):", max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True}, logprobs=2)
    choice = out.choices[0]
    assert choice.text == ref.text and choice.finish_reason == "length"
    assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens == ref.prompt_tokens
    lp = choice.logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == 12
    # greedy picks the most likely token; two ids may decode to one string (a partial UTF-8 byte), so <= 2 keys
    assert all(1 <= len(top) <= 2 and max(top.values()) == chosen for top, chosen in zip(lp.top_logprobs,
                                                                                             lp.token_logprobs))


def test_completion_stream(server, client):
    ref = server["engine"].generate("import os", max_tokens=10, ignore_eos=True)
    chunks = list(client.completions.create(model=NAME, prompt="import os", max_tokens=10, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True},
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 10


def test_fim_via_suffix_and_infill_route(server, client):
    ref = server["engine"].infill("def add(a, b):\n    ", "\n    return c\n", max_tokens=8, ignore_eos=True)
    out = client.completions.create(model=NAME, prompt="def add(a, b):\n    ", suffix="\n    return c\n",
                                    max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].text == ref.text and out.usage.prompt_tokens == ref.prompt_tokens
    status, body = _post(server, "/infill", {"input_prefix": "def add(a, b):\n    ", "input_suffix": "\n    return c\n",
                                             "n_predict": 8, "temperature": 0, "ignore_eos": True})
    assert status == 200 and json.loads(body)["content"] == ref.text


def test_chat_and_chat_stream(server, client):
    messages = [{"role": "user", "content": "write a sort"}]
    ref = server["engine"].chat(messages, max_tokens=10, ignore_eos=True)
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert out.choices[0].message.content == ref.text and out.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_malformed_requests_are_400(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="x", temperature="hot")
    assert "temperature" in e.value.response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="x", top_p=0)
    status, body = _post(server, "/v1/completions", None, raw=b"{not json")
    assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"
    status, body = _post(server, "/v1/completions", {"max_tokens": 3})
    assert status == 400 and "prompt" in json.loads(body)["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")


def test_bad_auth_is_401(server):
    bad = openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model=NAME, prompt="x")
    assert e.value.response.json()["error"]["code"] == "invalid_api_key"
    status, _ = _post(server, "/infill", {"input_prefix": "a"}, key="wrong")
    assert status == 401


def test_over_limit_requests(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="x = 1\n" * 100, max_tokens=4)
    assert e.value.response.json()["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="x", max_tokens=1000)
    assert "at most 64" in e.value.response.json()["error"]["message"]
    limits = server["limits"]
    limits.max_concurrent = 1
    try:
        held = client.completions.create(model=NAME, prompt="x", max_tokens=64, stream=True,
                                         extra_body={"ignore_eos": True})
        next(iter(held))
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=NAME, prompt="x", max_tokens=2)
        held.close()
    finally:
        limits.max_concurrent = 48
    deadline = time.time() + 10  # the held stream's slot is given back once the server sees the disconnect
    while True:
        try:
            assert client.completions.create(model=NAME, prompt="x", max_tokens=2).choices[0].finish_reason
            break
        except openai.RateLimitError:
            assert time.time() < deadline
            time.sleep(0.1)


def test_32_concurrent_streaming_clients(server, client):
    prompts = [f"def f{i}(x):" for i in range(32)]
    engine = server["engine"]
    refs = engine.generate(prompts[:4], max_tokens=12, ignore_eos=True)

    def run(i):
        stream = client.completions.create(model=NAME, prompt=prompts[i], max_tokens=12, stream=True,
                                           temperature=0 if i < 4 else 0.8, seed=i, extra_body={"ignore_eos": True})
        parts, reason = [], None
        for c in stream:
            parts.append(c.choices[0].text)
            reason = c.choices[0].finish_reason or reason
        return "".join(parts), reason

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(run, range(32)))
    assert all(reason == "length" for _, reason in results)
    assert [text for text, _ in results[:4]] == [r.text for r in refs]


def test_cli_serve_answers_and_stops_on_ctrl_c(tmp_path):
    """``dscoder serve``: HTTP on a helper thread, the engine loop on the main thread; SIGINT ends it cleanly."""
    import os
    import signal
    import subprocess
    import sys

    ckpt = make_checkpoint(tmp_path / "ckpt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = "import sys; from dscoder.cli import main; sys.exit(main())"
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--model", str(ckpt), "--port", str(port),
                             "--max-len", "64", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 60
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        else:
            pytest.fail("the server did not come up: " + proc.stdout.read() if proc.poll() is not None else "")
        body = json.dumps({"model": str(ckpt), "prompt": "def f(x):", "max_tokens": 5, "temperature": 0}).encode()
        req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
        assert answer["usage"]["completion_tokens"] >= 1 and answer["choices"][0]["finish_reason"] in ("stop", "length")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
