"""The OpenAI-compatible server, checked with the official ``openai`` client against uvicorn on a free port."""

from __future__ import annotations

import asyncio
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

from dscoder.cli import main  # noqa: E402
from dscoder.engine import Engine, SamplingParams  # noqa: E402
from dscoder.serve import Limits, create_app  # noqa: E402
from dscoder.serve.generation import Generation  # noqa: E402
from conftest import running_app  # noqa: E402

KEY = "test-key"
NAME = "tiny-coder"


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    engine = Engine(tiny_checkpoint, max_batch_size=8, max_len=128)
    limits = Limits(max_tokens=64, max_concurrent=48)
    app = create_app(engine, model_name=NAME, api_key=KEY, limits=limits)
    with running_app(app) as url:
        yield {"url": url, "engine": engine, "limits": limits, "state": app.state.serve}
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _post(server, path, body, key=KEY, raw=None, timeout=60):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(server["url"] + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
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


def test_cli_serve_answers_and_stops_on_ctrl_c(tiny_checkpoint):
    """``dscoder serve``: HTTP on a helper thread, the engine loop on the main thread; SIGINT ends it cleanly."""
    import os
    import signal
    import subprocess
    import sys

    ckpt = tiny_checkpoint
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = "import sys; from dscoder.cli import main; sys.exit(main())"
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--model", str(ckpt), "--port", str(port),
                             "--max-len", "64", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            # Ctrl-C's default, even when this runs as a shell's background job (SIGINT ignored)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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


# ----- faults: each test fails if the fault comes back ---------------------------------------------------------------
def _error(status_body):
    status, body = status_body
    return status, json.loads(body)["error"]


def _health_ok(server, timeout=5):
    with urllib.request.urlopen(server["url"] + "/health", timeout=timeout) as r:
        return r.status == 200


def _wait_until(cond, seconds=10.0):
    """Poll ``cond`` until it holds or ``seconds`` pass (a bounded wait, not a sleep that hopes)."""
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize("path,body,field", [
    ("/v1/completions", {"prompt": "x", "max_tokens": "4"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 4.0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": "2"}, "n"),
    ("/v1/completions", {"prompt": "x", "temperature": True}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": "0.5"}, "top_p"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", 1]}, "stop"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "x", "seed": "1"}, "seed"),
    ("/v1/completions", {"prompt": [1.5, 2]}, "prompt"),
    ("/v1/completions", {"prompt": [True]}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": "true"}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ("/infill", {"input_prefix": "a", "n_predict": "4"}, "n_predict"),
])
def test_wrong_types_are_400_naming_the_field(server, path, body, field):
    status, error = _error(_post(server, path, body))
    assert status == 400 and error["param"] == field and error["message"].startswith(field + ":"), error
    assert "\n" not in error["message"]


def test_text_that_is_not_unicode_is_400(server):
    """A JSON "\\ud800" escape decodes to a lone surrogate the tokenizer cannot take: 400 with one line (not a 500
    and a traceback in the log), streaming or not, and the request's slot is given back."""
    state = server["state"]
    for path, body in [("/v1/completions", {"prompt": "\ud800 x", "max_tokens": 1}),
                       ("/v1/completions", {"prompt": "x", "suffix": "\udc80", "max_tokens": 1, "stream": True}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}], "max_tokens": 1}),
                       ("/infill", {"input_prefix": "\ud800", "n_predict": 1})]:
        status, error = _error(_post(server, path, body))
        assert status == 400 and "not valid Unicode: a lone surrogate" in error["message"], (path, error)
        assert "\n" not in error["message"]
    assert _wait_until(lambda: state.in_flight == 0)
    assert _post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1})[0] == 200


@pytest.mark.parametrize("flag", ["--max-concurrent", "--max-tokens-cap", "--port"])
def test_serve_limits_that_refuse_everything_are_one_line(tmp_path, capsys, flag):
    """0 started a server that answered every request 429 (or 400); refused before the model is loaded."""
    assert main(["serve", "--model", str(tmp_path / "never-read"), flag, "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dscoder: error: {flag}: expected") and err.count("\n") == 1, err


def test_body_over_the_cap_is_413_before_parsing(server):
    state = server["state"]
    limit = state.body_limit()
    # urllib sends "Connection: close" and the whole body before reading: the answer must still be the 413
    status, error = _error(_post(server, "/v1/completions", None, raw=b"x" * (limit + 1)))
    assert status == 413 and error["code"] == "request_too_large" and str(limit) in error["message"]
    # a chunked upload (no Content-Length) is cut off once it passes the cap
    host, port = server["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"x" * 65536
        for _ in range(limit // len(piece) + 1):
            s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        s.sendall(b"0\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 413")
    assert _health_ok(server)


def test_prompt_longer_than_the_context_is_refused_before_tokenizing(server, monkeypatch):
    state, engine = server["state"], server["engine"]
    calls = []
    for name in ("encode_prompt", "chat_ids", "fim_ids"):
        original = getattr(engine, name)
        monkeypatch.setattr(engine, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    chars = state.chars_per_token * engine.max_len  # at least max_len tokens, whatever the text
    huge = "a" * chars
    assert len(json.dumps({"prompt": huge})) < state.body_limit()  # under the body cap: the size check is the guard
    for path, body in [("/v1/completions", {"prompt": huge}),
                       ("/v1/completions", {"prompt": "def f():", "suffix": huge}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": huge}]})]:
        # (/infill truncates as llama.cpp does instead: tests/test_serve_clients.py::test_infill_truncates_*)
        status, error = _error(_post(server, path, body))
        assert status == 400 and error["code"] == "context_length_exceeded" and "at least" in error["message"], error
    assert calls == []
    # a prompt that does fit still goes through the tokenizer
    assert _post(server, "/v1/completions", {"prompt": "def f(x):", "max_tokens": 1})[0] == 200
    assert calls == ["encode_prompt"]


def test_chars_per_token_bounds_the_token_count(server):
    """The size check's premise: no text has fewer tokens than its characters / ``chars_per_token``."""
    state, tok = server["state"], server["engine"].tokenizer
    longest = max(tok.backend.get_vocab(with_added_tokens=True), key=len)
    texts = ["def f(x):\n    return x * 3 + y\n" * 20, " " * 300, "é€😀" * 50, longest * 10, "<｜fim▁begin｜>" * 5]
    for text in texts:
        assert len(tok.encode(text, allow_special=True)) * state.chars_per_token >= len(text), text[:40]


def test_tokenizing_does_not_block_health(server, client, monkeypatch):
    """A prompt being tokenized (held here on an event) must not stop the event loop from answering /health."""
    engine = server["engine"]
    entered, release = threading.Event(), threading.Event()
    original = engine.encode_prompt

    def slow_encode(prompt):
        entered.set()
        release.wait(timeout=30)
        return original(prompt)

    monkeypatch.setattr(engine, "encode_prompt", slow_encode)
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(client.completions.create, model=NAME, prompt="def f(x):", max_tokens=2)
        try:
            assert entered.wait(timeout=20)
            assert _health_ok(server, timeout=5)  # times out if tokenizing ran on the event loop
        finally:
            release.set()
        assert answer.result(timeout=60).choices[0].finish_reason == "length"


def test_abandoned_requests_free_their_slots(server, client, monkeypatch):
    """Non-streaming clients that hang up are cancelled and give their slots back while the engine is still busy
    (held here: its steps wait on an event), so the next client is admitted instead of getting 429."""
    engine, state, limits = server["engine"], server["state"], server["limits"]
    gate = threading.Event()
    step, submit = engine.scheduler.step, engine.submit
    seqs = []
    monkeypatch.setattr(engine.scheduler, "step", lambda: (gate.wait(timeout=30), step())[1])
    monkeypatch.setattr(engine, "submit", lambda *a, **k: seqs.append(submit(*a, **k)) or seqs[-1])
    monkeypatch.setattr(limits, "max_concurrent", 2)
    host, port = server["url"].removeprefix("http://").split(":")
    body = json.dumps({"prompt": "def f(x):", "max_tokens": 64, "ignore_eos": True}).encode()
    socks = []
    try:
        for _ in range(2):
            s = socket.create_connection((host, int(port)), timeout=10)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s" % (KEY.encode(), len(body), body))
            socks.append(s)
        assert _wait_until(lambda: state.in_flight == 2 and len(seqs) == 2)
        assert _error(_post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1}))[0] == 429
        for s in socks:
            s.close()
        assert _wait_until(lambda: state.in_flight == 0), "abandoned requests still hold their slots"
        abandoned = list(seqs)
        assert all(s.cancelled for s in abandoned)
    finally:
        for s in socks:
            s.close()
        gate.set()
    assert client.completions.create(model=NAME, prompt="x", max_tokens=2).choices[0].finish_reason == "length"
    assert _wait_until(lambda: all(s.done.is_set() for s in abandoned))
    assert {s.finish_reason for s in abandoned} == {"cancelled"}


def test_abandoned_streams_free_their_slots(server, monkeypatch):
    """A streaming client that hangs up at once, before any event (the engine is held), gives its slot back."""
    engine, state = server["engine"], server["state"]
    gate = threading.Event()
    step, submit = engine.scheduler.step, engine.submit
    seqs = []
    monkeypatch.setattr(engine.scheduler, "step", lambda: (gate.wait(timeout=30), step())[1])
    monkeypatch.setattr(engine, "submit", lambda *a, **k: seqs.append(submit(*a, **k)) or seqs[-1])
    host, port = server["url"].removeprefix("http://").split(":")
    body = json.dumps({"prompt": "def f(x):", "max_tokens": 64, "stream": True, "ignore_eos": True}).encode()
    try:
        for _ in range(4):
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s" % (KEY.encode(), len(body), body))
        assert _wait_until(lambda: len(seqs) == 4), "the server did not take the requests"
        assert _wait_until(lambda: state.in_flight == 0), "abandoned streams still hold their slots"
        assert all(s.cancelled for s in seqs)
    finally:
        gate.set()


def test_stream_that_never_starts_still_frees_its_slot(server):
    """The client is gone before the first event is sent: the response ends without ever starting the events, and
    the request's slot and sequence must be released all the same."""
    state = server["state"]

    async def run():
        gen = Generation(state, [[1, 2, 3]], [SamplingParams(max_tokens=64, ignore_eos=True, stream=True)])
        assert state.in_flight == 1

        async def events():
            async for _ in gen.updates():
                yield "data: {}\n\n"

        async def receive():
            return {"type": "http.disconnect"}

        async def send(message):  # a client that never reads
            await asyncio.Event().wait()

        scope = {"type": "http", "asgi": {"spec_version": "2.3"}}
        await asyncio.wait_for(gen.stream(events())(scope, receive, send), timeout=10)
        return gen

    gen = asyncio.run(run())
    assert state.in_flight == 0 and gen.seqs[0].cancelled
    assert _wait_until(gen.seqs[0].done.is_set)
