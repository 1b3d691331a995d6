"""Editor clients' request bodies replayed against the server: llama.cpp's /infill and /completion, DeepSeek's
/beta/completions and OpenAI's /v1/completions. Each body is taken from the client's own request code (named in a
comment above it: repository and path); only sizes (n_predict, max_tokens) are cut so the tiny model answers fast."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest

uvicorn = pytest.importorskip("uvicorn")

from dscoder.engine import Completion, Engine  # noqa: E402
from dscoder.serve import Limits, create_app, prompts  # noqa: E402
from dscoder.serve.llamacpp import Watch, pick_fields  # noqa: E402
from dscoder.tokenizer import FIM_BEGIN_TOKEN, FIM_END_TOKEN, FIM_HOLE_TOKEN  # noqa: E402
from conftest import running_app  # noqa: E402

NAME = "dscoder-tiny-base"
PREFIX = "def f1(x):\n    return x * 1 + a\n\ndef f2(x):\n    return x * 2 + b\n\ndef f3(x):\n    "
SUFFIX = "\n\ndef f5(x):\n    return x * 5 + e\n"
# Continue's DeepSeek template stops on the FIM tokens, "//", the end-of-sentence token and per-language stops: a long
# list (DeepSeek's own API once refused it: "Stop string array too long"). 64 here.
LONG_STOP = [FIM_BEGIN_TOKEN, FIM_HOLE_TOKEN, FIM_END_TOKEN, "//", "<｜end▁of▁sentence｜>"] + \
    [f"\n#stop{i}" for i in range(59)]


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    engine = Engine(tiny_checkpoint, max_batch_size=4, max_len=256, prefix_cache_mb=8)
    app = create_app(engine, model_name=NAME, limits=Limits(max_tokens=64, max_concurrent=16),
                     checkpoint="/models/DeepSeek-Coder-V2-Lite-Base")
    with running_app(app) as url:
        yield {"url": url, "engine": engine, "state": app.state.serve}
    engine.close()


def post(server, path, body, timeout=60):
    """(status, headers, raw text) of a JSON POST."""
    req = urllib.request.Request(server["url"] + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def post_json(server, path, body):
    status, headers, text = post(server, path, body)
    return status, json.loads(text)


def sse_events(text: str) -> list:
    """The JSON payloads of a server-sent event stream (``data: [DONE]`` kept as the string)."""
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def greedy_fim(server, prefix=PREFIX, suffix=SUFFIX, n=8) -> str:
    return server["engine"].infill(prefix, suffix, max_tokens=n, ignore_eos=True).text


# ----- llama.cpp /infill ------------------------------------------------------------------------------------------
LLAMA_VIM_FIELDS = ["content", "timings/prompt_n", "timings/prompt_ms", "timings/prompt_per_token_ms",
                    "timings/prompt_per_second", "timings/predicted_n", "timings/predicted_ms",
                    "timings/predicted_per_token_ms", "timings/predicted_per_second", "truncated", "tokens_cached"]


def test_llama_vim_infill_answers_the_fields_it_reads(server):
    # ggml-org/llama.vim autoload/llama.vim (llama#fim): the request body and the response_fields it reads back with
    # get(l:response, 'timings/prompt_n', 0) and the like
    body = {"id_slot": 0, "input_prefix": PREFIX, "input_suffix": SUFFIX,
            "input_extra": [{"text": "def helper(y):\n    return y\n", "filename": "util.py"}],
            "prompt": "    ret", "n_predict": 8, "stop": [], "n_indent": 4, "top_k": 40, "top_p": 0.90,
            "samplers": ["top_k", "top_p", "infill"], "stream": False, "cache_prompt": True,
            "t_max_prompt_ms": 500, "t_max_predict_ms": 1000, "response_fields": LLAMA_VIM_FIELDS}
    status, out = post_json(server, "/infill", body)
    assert status == 200, out
    assert set(out) == set(LLAMA_VIM_FIELDS), out  # flat keys, slash paths as they are
    assert isinstance(out["content"], str) and isinstance(out["truncated"], bool)
    assert isinstance(out["tokens_cached"], int) and out["timings/prompt_n"] > 0
    assert 0 <= out["timings/predicted_n"] <= 8 and out["timings/prompt_ms"] >= 0


def test_llama_vim_warm_up_prefills_and_the_next_request_reuses_it(server):
    # ggml-org/llama.vim autoload/llama.vim (llama#fim with prev == cache warm-up): n_predict 0, samplers [],
    # t_max_* 1, response_fields [""]
    prefix = PREFIX * 3  # several 32-token blocks
    warm = {"id_slot": 0, "input_prefix": prefix, "input_suffix": SUFFIX, "input_extra": [], "prompt": "",
            "n_predict": 0, "samplers": [], "stream": False, "cache_prompt": True, "t_max_prompt_ms": 1,
            "t_max_predict_ms": 1, "response_fields": [""]}
    status, out = post_json(server, "/infill", warm)
    assert status == 200 and out == {}, out
    status, full = post_json(server, "/infill", {**warm, "response_fields": None})
    assert status == 200 and full["content"] == "" and full["timings"]["predicted_n"] == 0
    assert full["tokens_predicted"] == 0 and full["stop"] is True
    # the real request after the warm-up: its prompt's blocks come from the prefix cache
    status, out = post_json(server, "/infill", {**warm, "n_predict": 4, "samplers": ["top_k", "top_p", "infill"],
                                                "t_max_predict_ms": 1000, "response_fields": LLAMA_VIM_FIELDS})
    assert status == 200, out
    if "cached_tokens" in Completion.__dataclass_fields__:  # the engine reports prefix-cache hits
        assert out["tokens_cached"] >= 32 and out["timings/prompt_n"] < len(prefix) // server["state"].chars_per_token


def test_llama_vscode_infill_and_warm_up(server):
    # ggml-org/llama.vscode src/llama-server.ts (createRequestPayload): the completion body (defaultRequestParams:
    # top_k 40, top_p 0.99, stream false, samplers, cache_prompt) and the no-predict warm-up body; it reads content,
    # timings and the rest of llama.cpp's full answer
    chunks = [{"text": "x = 1\n", "time": 1, "filename": "a.py"}]
    body = {"id_slot": 0, "input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": chunks, "prompt": "",
            "n_predict": 6, "n_cmpl": 1, "top_k": 40, "top_p": 0.99, "stream": False,
            "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "n_indent": 4, "t_max_prompt_ms": 500,
            "t_max_predict_ms": 2500}
    status, out = post_json(server, "/infill", body)
    assert status == 200, out
    for key, kind in [("content", str), ("stop", bool), ("truncated", bool), ("tokens_cached", int),
                      ("tokens_predicted", int), ("tokens_evaluated", int), ("stop_type", str), ("timings", dict),
                      ("model", str), ("has_new_line", bool)]:
        assert isinstance(out[key], kind), (key, out)
    assert out["model"] == NAME and "warning" not in out
    assert set(out["timings"]) >= {"prompt_n", "prompt_ms", "predicted_n", "predicted_ms", "predicted_per_second"}
    warm = {"id_slot": 0, "input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": chunks, "prompt": "",
            "n_predict": 0, "samplers": [], "cache_prompt": True, "t_max_prompt_ms": 500, "t_max_predict_ms": 1,
            "lora": [{"id": 0, "scale": 0.5}]}
    status, out = post_json(server, "/infill", warm)
    assert status == 200 and out["content"] == "" and out["tokens_predicted"] == 0, out


def test_infill_stream_is_llama_cpp_sse(server):
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 8, "temperature": 0, "ignore_eos": True,
            "stream": True}
    status, headers, text = post(server, "/infill", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse_events(text)
    assert all(e["stop"] is False and isinstance(e["content"], str) for e in events[:-1])
    assert events[-1]["stop"] is True and events[-1]["tokens_predicted"] == 8
    assert "".join(e["content"] for e in events) == greedy_fim(server)


# ----- llama.cpp /completion --------------------------------------------------------------------------------------
def test_continue_llamacpp_completion_streams_and_parses_the_fim_template(server):
    # continuedev/continue core/llm/llms/LlamaCpp.ts (_streamComplete + _convertArgs): {prompt, stream: true,
    # n_predict, frequency_penalty, presence_penalty, min_p, mirostat, stop, top_k, top_p, temperature}; undefined
    # options are dropped by JSON.stringify. The prompt is Continue's DeepSeek FIM template rendered as text.
    prompt = f"{FIM_BEGIN_TOKEN}{PREFIX}{FIM_HOLE_TOKEN}{SUFFIX}{FIM_END_TOKEN}"
    body = {"prompt": prompt, "stream": True, "n_predict": 8, "min_p": 0.05, "stop": LONG_STOP, "top_k": 40,
            "top_p": 0.95, "temperature": 0, "ignore_eos": True}
    status, headers, text = post(server, "/completion", body)
    assert status == 200, text
    events = sse_events(text)
    assert events and all(set(e) >= {"content", "stop"} for e in events)
    assert [e["stop"] for e in events] == [False] * (len(events) - 1) + [True]
    # the same ids as the FIM builder's, so the same greedy text (stops cannot match: none is in the output here)
    expected = greedy_fim(server)
    assert not any(s in expected for s in LONG_STOP)
    assert "".join(e["content"] for e in events) == expected


def test_tabby_llamacpp_completion(server):
    # TabbyML/tabby crates/http-api-bindings/src/completion/llama.rs (CompletionRequest): {seed, prompt, n_predict,
    # temperature, stream, penalty_last_n: 0, presence_penalty}; it reads content and stop from each event
    body = {"seed": 18446744073709551615, "prompt": "def f7(x):\n    return", "n_predict": 6, "temperature": 0.1,
            "stream": True, "penalty_last_n": 0, "presence_penalty": 0.0}
    status, _, text = post(server, "/completion", body)
    assert status == 200, text
    events = sse_events(text)
    assert events[-1]["stop"] is True and all(isinstance(e["content"], str) for e in events)
    # non-streamed (its next_edit_suggestion mode) reads "content" from the JSON body
    status, out = post_json(server, "/completion", {**body, "stream": False})
    assert status == 200 and isinstance(out["content"], str) and out["stop"] is True


# ----- OpenAI and DeepSeek ----------------------------------------------------------------------------------------
def test_tabby_openai_completion_with_suffix(server):
    # TabbyML/tabby crates/http-api-bindings/src/completion/openai.rs (CompletionRequest): {model, prompt: prefix,
    # suffix, max_tokens, temperature, stream: true, presence_penalty}; it reads choices[0].text / finish_reason
    body = {"model": NAME, "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 8, "temperature": 0.0, "stream": True,
            "presence_penalty": 0.0, "ignore_eos": True}
    status, _, text = post(server, "/v1/completions", body)
    assert status == 200, text
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and c["model"] == NAME for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks) == greedy_fim(server)


def test_presence_and_frequency_penalties_reach_the_engine(server):
    """Clients configured with nonzero penalties (Tabby's presence_penalty, Continue's options) are served, and the
    penalty is applied: the same as the engine's own penalised greedy decode."""
    engine = server["engine"]
    want = engine.generate(PREFIX, max_tokens=16, ignore_eos=True, presence_penalty=1.5,
                           frequency_penalty=0.5).text
    assert want != engine.generate(PREFIX, max_tokens=16, ignore_eos=True).text  # so a dropped penalty shows
    for path, body, read in (
            ("/v1/completions", {"model": NAME, "prompt": PREFIX, "max_tokens": 16, "temperature": 0.0,
                                 "presence_penalty": 1.5, "frequency_penalty": 0.5, "ignore_eos": True},
             lambda r: r["choices"][0]["text"]),
            ("/completion", {"prompt": PREFIX, "n_predict": 16, "temperature": 0.0, "presence_penalty": 1.5,
                             "frequency_penalty": 0.5, "ignore_eos": True}, lambda r: r["content"])):
        status, _, text = post(server, path, body)
        assert status == 200, text
        assert read(json.loads(text)) == want, path


def test_continue_openai_completion_with_a_long_stop_list(server):
    # continuedev/continue core/llm/llms/OpenAI.ts (legacy completions, _streamComplete/_streamFim): {model, prompt,
    # suffix, max_tokens, temperature, top_p, frequency_penalty, presence_penalty, stop, stream: true}
    body = {"model": NAME, "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 8, "temperature": 0, "top_p": 1,
            "stop": LONG_STOP, "stream": True}
    status, _, text = post(server, "/v1/completions", body)
    assert status == 200, text
    assert sse_events(text)[-1] == "[DONE]"


def test_continue_deepseek_beta_completions(server):
    # continuedev/continue core/llm/llms/Deepseek.ts (_streamFim): POST beta/completions {model, prompt: prefix,
    # suffix, max_tokens, temperature, top_p, frequency_penalty, presence_penalty, stop, stream: true}; it yields
    # chunk.choices[0].text. Continue caps DeepSeek's list at 16 (maxStopWords); here the long one is accepted too.
    body = {"model": NAME, "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 8, "temperature": 0, "top_p": 1,
            "stop": LONG_STOP, "stream": True, "ignore_eos": True}
    status, _, text = post(server, "/beta/completions", body)
    assert status == 200, text
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in events[:-1]) == greedy_fim(server)
    status, out = post_json(server, "/beta/completions", {**body, "stream": False})
    usage = out["usage"]
    assert status == 200 and out["object"] == "text_completion"
    assert usage["prompt_cache_hit_tokens"] + usage["prompt_cache_miss_tokens"] == usage["prompt_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_cache_hit_tokens"]


def test_same_greedy_fim_text_from_every_route(server):
    expected = greedy_fim(server)
    common = {"temperature": 0, "ignore_eos": True}
    _, infill = post_json(server, "/infill", {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 8,
                                              **common})
    _, v1 = post_json(server, "/v1/completions", {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 8, **common})
    _, beta = post_json(server, "/beta/completions", {"model": NAME, "prompt": PREFIX, "suffix": SUFFIX,
                                                      "max_tokens": 8, **common})
    _, raw = post_json(server, "/completion", {"prompt": f"{FIM_BEGIN_TOKEN}{PREFIX}{FIM_HOLE_TOKEN}{SUFFIX}"
                                                         f"{FIM_END_TOKEN}", "n_predict": 8, **common})
    assert infill["content"] == v1["choices"][0]["text"] == beta["choices"][0]["text"] == raw["content"] == expected
    assert infill["truncated"] is False
    assert v1["usage"]["prompt_tokens"] == infill["tokens_evaluated"]


def test_served_model_name_and_unknown_models(server):
    status, out = post_json(server, "/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "x"})
    assert status == 404 and out["error"]["code"] == "model_not_found" and NAME in out["error"]["message"]
    status, out = post_json(server, "/beta/completions", {"model": "deepseek-coder", "prompt": "x", "suffix": "y"})
    assert status == 404 and out["error"]["param"] == "model", out
    # llama.cpp's routes ignore "model", as llama.cpp's server does (llama.vscode sends the name it is configured with)
    for path, body in [("/infill", {"model": "qwen2.5-coder", "input_prefix": "x", "n_predict": 1}),
                       ("/completion", {"model": "qwen2.5-coder", "prompt": "x", "n_predict": 1})]:
        status, out = post_json(server, path, body)
        assert status == 200 and out["model"] == NAME, (path, out)
    from dscoder.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "ckpt", "--served-model-name", "deepseek-coder-lite"])
    assert args.model_name == "deepseek-coder-lite"


# ----- FIM builder: repository context, budgets, truncation -------------------------------------------------------
def _build(server, *args, **kw):
    return asyncio.run(prompts.fim_request_ids(server["state"], *args, **kw))


def test_fim_prompt_layout_with_repository_context(server):
    tok = server["engine"].tokenizer
    extra = [("pkg/a.py", "A = 1"), ("pkg/b.py", "B = 2\n")]
    fim = _build(server, PREFIX, SUFFIX, extra=extra, typed="    ret")
    chunks = [tok.encode("# pkg/a.py\nA = 1\n"), tok.encode("# pkg/b.py\nB = 2\n")]
    expected = [tok.bos_id, tok.fim_begin_id, *chunks[0], *chunks[1], *tok.encode(PREFIX), *tok.encode("    ret"),
                tok.fim_hole_id, *tok.encode(SUFFIX), tok.fim_end_id]
    assert fim.ids == expected and not fim.truncated and fim.chunks_kept == 2
    assert _build(server, PREFIX, SUFFIX).ids == server["engine"].fim_ids(PREFIX, SUFFIX)  # the engine's layout


def test_infill_truncates_as_llama_cpp_budgets(server, monkeypatch):
    state, tok = server["state"], server["engine"].tokenizer
    monkeypatch.setattr(prompts, "FIM_BATCH", 64)  # so that extra context has room in the 256-token test context
    seen = []
    encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text, *a, **k: seen.append(len(text)) or encode(text, *a, **k))
    huge_prefix = PREFIX * 400  # far more than the context; never tokenized whole
    fim = _build(server, huge_prefix, SUFFIX * 40, extra=[("old.py", "o = 0\n" * 200), ("new.py", "n = 1\n")],
                 typed="", n_predict=16, truncate=True)
    assert fim.truncated and fim.n_prefix == 3 * (64 // 4) and fim.n_suffix == 64 // 4 - 2
    assert fim.chunks_kept == 1 and fim.chunks_dropped == 1  # the newest chunk kept, whole; the old one dropped
    assert fim.n_extra <= state.max_len - 64 - 2 * 16 and len(fim.ids) < state.max_len
    assert seen[0] <= (3 * (64 // 4) + 1) * state.chars_per_token < len(huge_prefix)  # the prefix, cut first
    assert max(seen) < len(huge_prefix) // 4
    # a typed line that leaves the suffix no room
    fim = _build(server, PREFIX, SUFFIX, typed="x" * 4000, truncate=True)
    assert fim.truncated and fim.n_suffix == 0 and fim.n_typed == 64 // 4 - 2
    # without truncate (OpenAI) a prompt over the context is refused, not cut
    status, out = post_json(server, "/v1/completions", {"prompt": huge_prefix, "suffix": SUFFIX})
    assert status == 400 and out["error"]["code"] == "context_length_exceeded"


def test_infill_route_reports_truncation(server):
    body = {"input_prefix": PREFIX * 60, "input_suffix": SUFFIX, "n_predict": 2, "temperature": 0}
    status, out = post_json(server, "/infill", body)
    assert status == 200 and out["truncated"] is True and out["tokens_evaluated"] < server["state"].max_len


def test_fim_on_an_instruct_checkpoint_warns(server, monkeypatch):
    state = server["state"]
    monkeypatch.setattr(state, "checkpoint", "/models/DeepSeek-Coder-V2-Lite-Instruct/")
    status, headers, text = post(server, "/infill", {"input_prefix": "def f(", "n_predict": 2})
    out = json.loads(text)
    assert status == 200 and "Base" in out["warning"] and headers["x-dscoder-warning"] == out["warning"]
    status, out = post_json(server, "/v1/completions", {"prompt": "def f(", "suffix": ")", "max_tokens": 2})
    assert status == 200 and "instruct" in out["warning"]
    status, out = post_json(server, "/v1/completions", {"prompt": "def f(", "max_tokens": 2})  # not FIM
    assert status == 200 and "warning" not in out
    monkeypatch.setattr(state, "checkpoint", "/models/DeepSeek-Coder-V2-Lite-Base")
    assert prompts.fim_warning(state) is None


# ----- early stops ------------------------------------------------------------------------------------------------
class _Seq:
    def __init__(self):
        self.cancelled = False
        self.text = ""


def _watch(**kw):
    body = type("B", (), {"t_max_predict_ms": -1, "n_indent": 0, **kw})()
    return Watch(body)


def test_n_indent_ends_before_a_less_indented_line():
    watch, seq = _watch(n_indent=4), _Seq()
    shown = [watch(0, seq, d, [1], False) for d in ["x = 1\n", "    y = 2\n", "\n", "  ", "z"]]
    assert seq.cancelled and watch.content(seq) == "x = 1\n    y = 2\n\n"
    assert "".join(shown) == "x = 1\n    y = 2\n\n"  # the short line's indentation was held back, never shown
    watch, seq = _watch(n_indent=4), _Seq()
    for d in ["a\n", "    b\n", "        c"]:
        watch(0, seq, d, [1], False)
    assert not seq.cancelled


def test_t_max_predict_ms_stops_after_a_newline_once_the_time_has_passed():
    watch, seq = _watch(t_max_predict_ms=5), _Seq()
    watch(0, seq, "abc", [1], False)
    watch.t_first -= 1.0  # a second has passed since the first token
    watch(0, seq, "def", [1], False)
    assert not seq.cancelled  # no newline yet: llama.cpp keeps going
    watch(0, seq, "\ng", [1], False)
    assert seq.cancelled and watch.content(seq) == "abcdef\ng"


def test_response_fields_pick_slash_paths():
    out = {"content": "x", "timings": {"prompt_n": 3}, "truncated": False}
    assert pick_fields(out, ["content", "timings/prompt_n", "timings/nothing", ""]) == \
        {"content": "x", "timings/prompt_n": 3}
    assert pick_fields(out, None) == out and pick_fields(out, [""]) == {}


# ----- bad input --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path,body,field", [
    ("/infill", {"input_prefix": "a", "input_extra": "util.py"}, "input_extra"),
    ("/infill", {"input_prefix": "a", "input_extra": [{"filename": "a.py", "text": 5}]}, "input_extra.0.text"),
    ("/infill", {"input_prefix": "a", "n_predict": "4"}, "n_predict"),
    ("/infill", {"input_prefix": "a", "stop": "\n"}, "stop"),
    ("/infill", {"input_prefix": "a", "n_indent": -1}, "n_indent"),
    ("/infill", {"input_prefix": 5}, "input_prefix"),
    ("/infill", {"input_prefix": "a", "n_predict": 100000}, "n_predict"),
    ("/infill", {"input_prefix": "a", "presence_penalty": 5}, "presence_penalty"),
    ("/completion", {}, "prompt"),
    ("/completion", {"prompt": []}, "prompt"),
    ("/completion", {"prompt": [1.5]}, "prompt"),
    ("/completion", {"prompt": "x", "temperature": "0"}, "temperature"),
    ("/completion", {"prompt": "x", "stop": ["s"] * 2000}, "stop"),
    ("/beta/completions", {"prompt": "x", "suffix": 3}, "suffix"),
    ("/beta/completions", {"prompt": "x", "stop": ["s" * 5000]}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": ["s"] * 2000}, "stop"),
])
def test_bad_input_is_a_4xx_json_error(server, path, body, field):
    status, headers, text = post(server, path, body)
    out = json.loads(text)
    assert 400 <= status < 500 and headers["content-type"] == "application/json", (status, text)
    assert out["error"]["param"] == field and "\n" not in out["error"]["message"], out
    status, _, text = post(server, path, None)  # "null": not an object
    assert status == 400 and "error" in json.loads(text)
