"""``dscoder eval table RUN_DIR... --out DIR``: the DeepSeek-Coder-V2 paper's evaluation table with measured scores
beside the published ones, as markdown (``table.md``) and a bar chart (``table.png``).

Each RUN_DIR is a ``dscoder eval`` output folder; its ``summary.json`` gives the task and its score (pass@1, the
exact match of GSM8K and FIM, MATH's accuracy; LiveCodeBench's difficulties as rows of their own). The published
figures are those of the paper's tables (arXiv 2406.11931): Table 3 (HumanEval Python, MBPP+), Table 4
(LiveCodeBench 2023-12-01 to 2024-06-01, overall and per difficulty) and Table 9 (GSM8K, MATH), for
DeepSeek-Coder-V2-Lite-Instruct and DeepSeek-Coder-V2-Instruct; a task the paper does not report shows "-".
"""

from __future__ import annotations

import json
from pathlib import Path

from dscoder.errors import DscoderError
from dscoder.io import atomic_write, write_text

LITE, FULL = "DeepSeek-Coder-V2-Lite-Instruct", "DeepSeek-Coder-V2-Instruct"
PAPER: dict[str, dict[str, float]] = {  # percent
    LITE: {"humaneval": 81.1, "mbpp+": 68.8, "livecodebench": 24.3, "livecodebench/easy": 58.5,
           "livecodebench/medium": 8.0, "livecodebench/hard": 0.0, "gsm8k": 86.4, "math": 61.8},
    FULL: {"humaneval": 90.2, "mbpp+": 76.2, "livecodebench": 43.4, "livecodebench/easy": 84.1,
           "livecodebench/medium": 29.9, "livecodebench/hard": 5.3, "gsm8k": 94.9, "math": 75.7},
}
ORDER = ("humaneval", "humaneval+", "mbpp", "mbpp+", "livecodebench", "livecodebench/easy", "livecodebench/medium",
         "livecodebench/hard", "multipl-e", "fim", "gsm8k", "math", "niah")
METRIC = {"gsm8k": "exact_match", "fim": "exact_match", "math": "accuracy", "niah": "accuracy"}


def measured(run: Path) -> list[tuple[str, float, str]]:
    """(row, score in percent, run name) from one eval output folder."""
    path = Path(run) / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        task = summary["task"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DscoderError(f"{run}: not a dscoder eval output folder (no readable summary.json with a task)") \
            from None
    metric = METRIC.get(task, "pass@1")
    rows = []
    if isinstance(summary.get(metric), (int, float)):
        rows.append((task, 100.0 * summary[metric], Path(run).name))
    for level, part in (summary.get("difficulties") or {}).items():
        if isinstance(part, dict) and isinstance(part.get("pass@1"), (int, float)):
            rows.append((f"{task}/{level}", 100.0 * part["pass@1"], Path(run).name))
    if not rows:
        raise DscoderError(f"{path}: no {metric} score to show")
    return rows


def table_rows(runs: list[str | Path]) -> list[dict]:
    """One row per measured (task, run) in the paper's order: task, run, measured, and the two published figures."""
    found = [row for run in runs for row in measured(Path(run))]
    rank = {name: i for i, name in enumerate(ORDER)}
    found.sort(key=lambda r: (rank.get(r[0], len(ORDER)), r[0], r[2]))
    return [{"task": task, "run": run, "measured": score, LITE: PAPER[LITE].get(task), FULL: PAPER[FULL].get(task)}
            for task, score, run in found]


def markdown(rows: list[dict]) -> str:
    def cell(v):
        return "-" if v is None else f"{v:.1f}"

    lines = [f"| task | run | measured | {LITE} (paper) | {FULL} (paper) |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['task']} | {r['run']} | {cell(r['measured'])} | {cell(r[LITE])} | {cell(r[FULL])} |"
              for r in rows]
    return "\n".join(lines) + "\n\nScores in percent: pass@1 (HumanEval, MBPP, EvalPlus base + plus, LiveCodeBench, " \
        "MultiPL-E), exact match (GSM8K, FIM), accuracy (MATH). Published figures: DeepSeek-Coder-V2 paper, Tables " \
        "3, 4 and 9 (instruct models; LiveCodeBench 2023-12-01 to 2024-06-01).\n"


def write_table(runs: list[str | Path], out: str | Path) -> tuple[Path, Path]:
    """Write ``out/table.md`` and ``out/table.png``; returns their paths."""
    rows = table_rows(runs)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DscoderError(f"--out {out}: is a file, expected a folder")
    out.mkdir(parents=True, exist_ok=True)
    md = out / "table.md"
    write_text(md, markdown(rows))
    png = out / "table.png"
    _plot(rows, png)
    return md, png


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['task']}\n({r['run']})" for r in rows]
    series = [("measured", "measured", "#1f77b4"), (LITE, "Lite-Instruct (paper)", "#ff7f0e"),
              (FULL, "Instruct (paper)", "#2ca02c")]
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows) + 2), 4.5))
    for j, (key, name, color) in enumerate(series):
        xs = [i + (j - 1) * width for i, r in enumerate(rows) if r[key] is not None]
        ys = [r[key] for r in rows if r[key] is not None]
        bars = ax.bar(xs, ys, width, label=name, color=color)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("score (%)")
    ax.set_title("DeepSeek-Coder-V2 evaluation: measured vs published")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
