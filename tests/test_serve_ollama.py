"""Ollama's API in ``dscoder serve`` (``/api/generate``, ``/api/chat``, ``/api/tags``, ``/api/show``, ``/api/ps``,
``/api/version``), replaying the requests Continue's Ollama provider sends, against uvicorn on a free port."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import pytest

uvicorn = pytest.importorskip("uvicorn")

from dscoder.engine import Engine  # noqa: E402
from dscoder.serve import Limits, create_app  # noqa: E402
from conftest import running_app  # noqa: E402

KEY = "test-key"
NAME = "tiny-coder"  # a base checkpoint's name
INSTRUCT = "tiny-coder-instruct"  # the same weights under a chat/instruct name

# Continue's DeepSeek autocomplete template and its stop list
# (continuedev/continue core/autocomplete/templating/AutocompleteTemplate.ts, deepseekFimTemplate)
DEEPSEEK_STOPS = ["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>", "//", "<｜end▁of▁sentence｜>"]
PREFIX, SUFFIX = "def add(a, b):\n    ", "\n    return c\n"


@pytest.fixture(scope="module")
def servers(tiny_checkpoint):
    engine = Engine(tiny_checkpoint, max_batch_size=8, max_len=128)
    apps = [create_app(engine, model_name=name, api_key=KEY, limits=Limits(max_tokens=64)) for name in (NAME, INSTRUCT)]
    with running_app(apps[0]) as base, running_app(apps[1]) as instruct:
        yield {"base": base, "instruct": instruct, "engine": engine}
    engine.close()


@pytest.fixture(scope="module")
def url(servers):
    return servers["base"]


def _call(url, path, body=None, raw=None, method=None):
    """(status, content type, text) of one request, as a client with the key sends it."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, method=method or ("GET" if data is None else "POST"),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def _ndjson(text: str) -> list[dict]:
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def _check_stream(lines: list[dict], key: str) -> str:
    """Ollama's stream shape: objects with done false, then one done true with the stats; the text joined."""
    *chunks, last = lines
    for c in chunks:
        assert c["done"] is False and c["model"] and c["created_at"].endswith("Z"), c
    assert last["done"] is True and last["done_reason"] in ("stop", "length")
    for stat in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
                 "eval_duration"):
        assert isinstance(last[stat], int) and last[stat] >= 0, (stat, last)
    assert last["total_duration"] >= last["prompt_eval_duration"]
    if key == "response":
        return "".join(c["response"] for c in chunks) + last["response"]
    assert all(c["message"]["role"] == "assistant" for c in lines)
    return "".join(c["message"]["content"] for c in lines)


# ----- the model's facts ---------------------------------------------------------------------------------------------
def test_tags_show_ps_version(url, servers):
    status, _, text = _call(url, "/api/tags")
    models = json.loads(text)["models"]
    assert status == 200 and [m["name"] for m in models] == [NAME] and models[0]["model"] == NAME
    m = models[0]
    assert m["size"] > 0 and re.fullmatch(r"[0-9a-f]{64}", m["digest"]) and m["modified_at"].endswith("Z")
    assert {"family", "parameter_size", "quantization_level", "format"} <= set(m["details"])
    assert m["details"]["quantization_level"] == "F32"

    # Continue asks /api/show with {"name": model} and turns FIM on when `template.includes(".Suffix")`; it reads
    # `parameters` line by line with /^(\S+)\s+((?:".*")|\S+)$/ (an older Continue throws on a line that does not
    # match, before it looks at the template) (continuedev/continue core/llm/llms/Ollama.ts)
    status, _, text = _call(url, "/api/show", {"name": NAME})
    show = json.loads(text)
    assert status == 200 and ".Suffix" in show["template"] and "insert" in show["capabilities"]
    params = dict(re.match(r"^(\S+)\s+((?:\".*\")|\S+)$", line).groups() for line in show["parameters"].split("\n"))
    assert params == {"num_ctx": "128"}
    assert show["model_info"]["deepseek2.context_length"] == 128 and show["details"] == m["details"]
    assert _call(url, "/api/show", {"model": NAME + ":latest"})[0] == 200  # Ollama's default tag

    status, _, text = _call(servers["instruct"], "/api/show", {"model": INSTRUCT})
    show = json.loads(text)
    assert status == 200 and ".Suffix" not in show["template"] and "insert" not in show["capabilities"]

    status, _, text = _call(url, "/api/ps")
    assert status == 200 and json.loads(text)["models"][0]["name"] == NAME
    status, _, text = _call(url, "/api/version")
    assert status == 200 and isinstance(json.loads(text)["version"], str)


# ----- /api/generate --------------------------------------------------------------------------------------------------
def continue_fim_body(prefix: str, suffix: str, **options) -> dict:
    """The body of Continue's Ollama `_streamFim` (continuedev/continue core/llm/llms/Ollama.ts,
    `_getGenerateOptions(options, prefix, suffix)`): `raw` is `options.raw`, undefined for FIM and so dropped by
    JSON.stringify; `options` from `_getModelFileParams` (num_ctx defaults to 8192 before /api/show answers);
    `keep_alive` 60 * 30; `stream` from the completion options (true for autocomplete)."""
    return {"model": NAME, "prompt": prefix, "suffix": suffix,
            "options": {"temperature": 0, "num_predict": 8, "stop": DEEPSEEK_STOPS, "num_ctx": 8192, **options},
            "keep_alive": 1800, "stream": True}


def test_continue_fim_request_streams_ndjson(url, servers):
    ref = servers["engine"].infill(PREFIX, SUFFIX, max_tokens=8, stop=DEEPSEEK_STOPS)
    status, ctype, text = _call(url, "/api/generate", continue_fim_body(PREFIX, SUFFIX))
    assert status == 200 and ctype.startswith("application/x-ndjson")
    lines = _ndjson(text)
    assert _check_stream(lines, "response") == ref.text
    assert lines[-1]["eval_count"] == ref.completion_tokens and lines[-1]["prompt_eval_count"] == ref.prompt_tokens
    assert "warning" not in lines[-1]  # a base checkpoint: FIM is what it was trained for


def test_continue_raw_template_prompt_is_the_fim_prompt(url, servers):
    """Without FIM support Continue renders its DeepSeek template itself and sends it with `raw: true`
    (continuedev/continue core/autocomplete/generation/CompletionStreamer.ts: `streamComplete(prompt,
    {...completionOptions, raw: true})`): the special-token strings must be the FIM tokens."""
    ref = servers["engine"].infill(PREFIX, SUFFIX, max_tokens=8, stop=DEEPSEEK_STOPS)
    body = continue_fim_body(f"<｜fim▁begin｜>{PREFIX}<｜fim▁hole｜>{SUFFIX}<｜fim▁end｜>", "")
    del body["suffix"]
    status, _, text = _call(url, "/api/generate", {**body, "raw": True, "stream": False})
    out = json.loads(text)
    assert status == 200 and out["response"] == ref.text and out["prompt_eval_count"] == ref.prompt_tokens


def test_generate_base_prompt_options_and_template(url, servers):
    ref = servers["engine"].generate("import os\n", max_tokens=10, ignore_eos=False)
    status, ctype, text = _call(url, "/api/generate", {"model": NAME, "prompt": "import os\n", "stream": False,
                                                       "options": {"num_predict": 10, "temperature": 0, "seed": 7}})
    out = json.loads(text)
    assert status == 200 and ctype.startswith("application/json")
    assert out["response"] == ref.text and out["done"] is True and out["eval_count"] == ref.completion_tokens
    # a base checkpoint's template is the prompt itself: `system` has no place in it, the answer is the same
    out2 = json.loads(_call(url, "/api/generate", {"model": NAME, "prompt": "import os\n", "stream": False,
                                                   "system": "be brief", "options": {"num_predict": 10,
                                                                                     "temperature": 0}})[2])
    assert out2["response"] == ref.text
    # Continue passes presence/frequency penalties through options: applied as the engine applies them
    pen = servers["engine"].generate("import os\n", max_tokens=10, presence_penalty=1.0, frequency_penalty=0.5)
    assert pen.text != ref.text  # so a dropped penalty shows
    out3 = json.loads(_call(url, "/api/generate", {"model": NAME, "prompt": "import os\n", "stream": False,
                                                   "options": {"num_predict": 10, "temperature": 0,
                                                               "presence_penalty": 1.0, "frequency_penalty": 0.5}})[2])
    assert out3["response"] == pen.text
    # a request template with Ollama's variables
    out3 = json.loads(_call(url, "/api/generate", {"model": NAME, "prompt": "os\n", "stream": False,
                                                   "template": "import {{ .Prompt }}",
                                                   "options": {"num_predict": 10, "temperature": 0}})[2])
    assert out3["response"] == ref.text
    # sampled with a seed: the same seed, the same text
    body = {"model": NAME, "prompt": "def", "stream": False, "options": {"num_predict": 12, "seed": 3,
                                                                         "temperature": 1.0, "top_k": 0}}
    assert json.loads(_call(url, "/api/generate", body)[2])["response"] == \
        json.loads(_call(url, "/api/generate", body)[2])["response"]


def test_instruct_checkpoint_uses_chat_template_and_warns_on_fim(servers):
    url = servers["instruct"]
    ref = servers["engine"].chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "sort"}],
                                 max_tokens=8)
    out = json.loads(_call(url, "/api/generate", {"model": INSTRUCT, "prompt": "sort", "system": "be brief",
                                                  "stream": False, "options": {"num_predict": 8,
                                                                               "temperature": 0}})[2])
    assert out["response"] == ref.text and out["prompt_eval_count"] == ref.prompt_tokens
    body = {**continue_fim_body(PREFIX, SUFFIX), "model": INSTRUCT}
    lines = _ndjson(_call(url, "/api/generate", body)[2])
    assert "instruct" in lines[-1]["warning"] and lines[-1]["done"] is True
    # the FIM template rendered by the client (raw) is warned about too; a raw prompt without FIM tokens is not
    raw = {"model": INSTRUCT, "raw": True, "stream": False, "options": {"num_predict": 2}}
    fim_text = "<｜fim▁begin｜>a<｜fim▁hole｜>b<｜fim▁end｜>"
    out = json.loads(_call(url, "/api/generate", {**raw, "prompt": fim_text})[2])
    assert "instruct" in out["warning"]
    assert "warning" not in json.loads(_call(url, "/api/generate", {**raw, "prompt": "User: hi"})[2])


def test_empty_prompt_loads_or_unloads(url):
    out = json.loads(_call(url, "/api/generate", {"model": NAME})[2])
    assert out == {"model": NAME, "created_at": out["created_at"], "response": "", "done": True,
                   "done_reason": "load"}
    assert json.loads(_call(url, "/api/generate", {"model": NAME, "keep_alive": 0})[2])["done_reason"] == "unload"
    out = json.loads(_call(url, "/api/chat", {"model": NAME, "messages": [], "keep_alive": "5m"})[2])
    assert out["done_reason"] == "load" and out["message"] == {"role": "assistant", "content": ""}


# ----- /api/chat ------------------------------------------------------------------------------------------------------
def test_chat_stream_and_not(url, servers):
    # Continue's `_streamChat` body: model, messages, options, keep_alive, stream (continuedev/continue
    # core/llm/llms/Ollama.ts)
    messages = [{"role": "system", "content": "you write python"}, {"role": "user", "content": "write a sort"}]
    ref = servers["engine"].chat(messages, max_tokens=10)
    body = {"model": NAME, "messages": messages, "options": {"temperature": 0, "num_predict": 10, "num_ctx": 8192},
            "keep_alive": 1800, "stream": True}
    status, ctype, text = _call(url, "/api/chat", body)
    assert status == 200 and ctype.startswith("application/x-ndjson")
    lines = _ndjson(text)
    assert _check_stream(lines, "message") == ref.text and lines[-1]["eval_count"] == ref.completion_tokens
    out = json.loads(_call(url, "/api/chat", {**body, "stream": False})[2])
    assert out["message"] == {"role": "assistant", "content": ref.text} and out["done"] is True


# ----- errors ---------------------------------------------------------------------------------------------------------
BAD = [
    ("/api/generate", {"model": "llama3", "prompt": "x"}, 404, "model 'llama3' not found"),
    ("/api/generate", {"model": NAME, "prompt": "a\ud800b", "stream": False}, 400, "not valid Unicode"),
    ("/api/generate", {"model": NAME, "prompt": "a", "suffix": "\ud800", "stream": False}, 400, "not valid Unicode"),
    ("/api/chat", {"model": NAME, "messages": [{"role": "user", "content": "\udfff"}]}, 400, "not valid Unicode"),
    ("/api/generate", {"prompt": "x"}, 400, "model is required"),
    ("/api/generate", b"{not json", 400, "not valid JSON"),
    ("/api/generate", b"[1, 2]", 400, "JSON object"),
    ("/api/generate", {"model": NAME, "prompt": 5}, 400, "prompt"),
    ("/api/generate", {"model": NAME, "prompt": "x", "options": {"temperature": "hot"}}, 400, "options.temperature"),
    ("/api/generate", {"model": NAME, "prompt": "x", "options": {"top_p": 0}}, 400, "options.top_p"),
    ("/api/generate", {"model": NAME, "prompt": "x", "options": {"min_p": 0.1}}, 400, "options.min_p"),
    ("/api/generate", {"model": NAME, "prompt": "x", "options": {"num_predict": 10 ** 6}}, 400, "num_predict"),
    ("/api/generate", {"model": NAME, "prompt": "x", "options": {"stop": [1]}}, 400, "options.stop"),
    ("/api/generate", {"model": NAME, "prompt": "x", "raw": True, "system": "s"}, 400, "raw mode"),
    ("/api/generate", {"model": NAME, "prompt": "x", "format": "json"}, 400, "format"),
    ("/api/generate", {"model": NAME, "prompt": "x", "images": ["aGk="]}, 400, "images"),
    ("/api/generate", {"model": NAME, "prompt": "x", "context": [1, 2]}, 400, "context"),
    ("/api/generate", {"model": NAME, "prompt": "x", "template": "{{ if .System }}{{ end }}"}, 400, "template"),
    ("/api/generate", {"model": NAME, "prompt": "x", "keep_alive": "soon"}, 400, "keep_alive"),
    ("/api/generate", {"model": NAME, "prompt": "x", "think": True}, 400, "thinking"),
    ("/api/generate", {"model": NAME, "prompt": "x" * 5000}, 400, "context"),
    ("/api/generate", {"model": NAME, "prompt": "x" * 3000, "suffix": "y" * 3000}, 400, "context"),
    ("/api/chat", {"model": "other", "messages": [{"role": "user", "content": "hi"}]}, 404, "not found"),
    ("/api/chat", {"model": NAME, "messages": [{"role": "tool", "content": "hi"}]}, 400, "messages.0.role"),
    ("/api/chat", {"model": NAME, "messages": [{"content": "hi"}]}, 400, "messages.0.role"),
    ("/api/chat", {"model": NAME, "messages": "hi"}, 400, "messages"),
    ("/api/chat", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     400, "tools"),
    ("/api/chat", {"model": NAME, "messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}, 400,
     "images"),
    ("/api/chat", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
    ("/api/show", {"name": "llama3"}, 404, "not found"),
    ("/api/show", {}, 400, "model is required"),
]


@pytest.mark.parametrize("path,body,status,needle", BAD, ids=[f"{p}-{n}" for p, _, _, n in BAD])
def test_bad_input_gets_ollamas_error_shape(url, path, body, status, needle):
    got, ctype, text = _call(url, path, raw=body if isinstance(body, bytes) else None,
                             body=None if isinstance(body, bytes) else body)
    out = json.loads(text)
    assert got == status and ctype.startswith("application/json"), (got, text)
    assert list(out) == ["error"] and isinstance(out["error"], str) and needle in out["error"], out
    assert "\n" not in out["error"]


def test_refusals_before_the_route_get_ollamas_shape_too(url, servers):
    """The bearer check, the body cap and routes Ollama has but this server does not answer {"error": "..."} under
    /api/ (Ollama's clients read a string there: Continue throws `new Error(j.error)`), OpenAI's shape elsewhere."""
    req = urllib.request.Request(url + "/api/tags", headers={"Authorization": "Bearer wrong"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 401 and isinstance(json.loads(e.value.read())["error"], str)
    big = json.dumps({"model": NAME, "prompt": "x" * (40 * 128 + (1 << 20))}).encode()
    status, _, text = _call(url, "/api/generate", raw=big)
    assert status == 413 and isinstance(json.loads(text)["error"], str)
    status, _, text = _call(url, "/v1/completions", raw=big)
    assert status == 413 and isinstance(json.loads(text)["error"], dict)  # the OpenAI routes keep theirs
    for path, body, method, code, needle in [("/api/pull", {"model": NAME}, None, 404, "not served here"),
                                             ("/api/generate", None, "GET", 405, "use POST"),
                                             ("/api/tags", {}, None, 405, "use GET")]:
        status, _, text = _call(url, path, body, method=method)
        assert status == code and needle in json.loads(text)["error"], (path, status, text)


# ----- one FIM text across every route --------------------------------------------------------------------------------
def test_same_greedy_fim_text_from_every_route(url, servers):
    """The issue's "Done when": /infill, /v1/completions, /beta/completions and /api/generate give the same greedy
    infill for the same prefix and suffix (one FIM prompt builder behind them)."""
    n = 12
    ref = servers["engine"].infill(PREFIX, SUFFIX, max_tokens=n)
    texts = {}
    texts["/infill"] = json.loads(_call(url, "/infill", {"input_prefix": PREFIX, "input_suffix": SUFFIX,
                                                         "n_predict": n, "temperature": 0})[2])["content"]
    for route in ("/v1/completions", "/beta/completions"):
        texts[route] = json.loads(_call(url, route, {"model": NAME, "prompt": PREFIX, "suffix": SUFFIX,
                                                     "max_tokens": n, "temperature": 0})[2])["choices"][0]["text"]
    texts["/api/generate"] = json.loads(_call(url, "/api/generate", {
        "model": NAME, "prompt": PREFIX, "suffix": SUFFIX, "stream": False,
        "options": {"num_predict": n, "temperature": 0}})[2])["response"]
    assert len(texts) == 4 and texts == {route: ref.text for route in texts}
