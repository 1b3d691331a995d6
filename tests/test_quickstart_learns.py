"""The quickstart's recipe and its evaluation pieces: parse rate, prompts as written, the corpus without tests, bits
per byte (the full run takes minutes: it is run by hand and by `make quickstart`)."""

from __future__ import annotations

import json
import math
import statistics
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch

from conftest import untrained_checkpoint
from dscoder.config import ModelConfig
from dscoder.quickstart import (HUMANEVAL_STOPS, complete, completion_loop_rate, completion_parse_rate, corpus_source,
                                held_out_files, heldout_scores, perplexity, recipe)
from dscoder.tokenizer import Tokenizer


def test_completion_parse_rate_cuts_at_the_stops():
    prompts = ['def f(x):\n    """Twice x."""\n'] * 4
    completions = [
        "    return 2 * x\n",                      # parses
        "    return 2 * x\ndef g(:\n",             # parses once cut at "\ndef "
        "    return (2 * x\n",                     # an open bracket: does not parse
        "",                                        # the prompt alone (a docstring body) parses
    ]
    assert completion_parse_rate(prompts, completions, HUMANEVAL_STOPS) == 0.75
    assert completion_parse_rate(prompts[:1], ["    return 2 *\n"], HUMANEVAL_STOPS) == 0.0
    from dscoder.eval.tasks import humaneval

    assert all(p.stop == HUMANEVAL_STOPS for p in humaneval())  # the stops the eval task cuts at


def test_completion_loop_rate_counts_one_line_repeated():
    loop = "    # 0.0\n" * 5 + "    return x\n"            # 5 of 6 lines the same comment: parses, and is a loop
    body = "    y = x\n    y = x\n    z = y\n    return z\n"  # 2 of 4 the same: not more than half
    short = "    x = 1\n" * 3                              # fewer than 4 lines
    assert completion_loop_rate([loop, body, short, loop + "def g():\n" + "    x = 1\n" * 9], HUMANEVAL_STOPS) == 0.5
    assert completion_loop_rate(["    x = 1\n    y = 2\ndef g():\n" + "    x = 1\n" * 9], HUMANEVAL_STOPS) == 0.0


@dataclass
class _Done:
    text: str


class _Engine:
    """Stands in for dscoder.Engine: records the prompts and answers from a table."""

    def __init__(self, answers):
        self.answers, self.seen = answers, []

    def generate(self, prompts, **sampling):
        self.seen += prompts
        return [_Done(self.answers[p]) for p in prompts]


def test_complete_gives_the_prompt_as_written():
    """The model sees each prompt unchanged: the tokenizer keeps a docstring's closing quotes and the newline after
    them together (the token a function's body follows in training), so stripping the newline would leave the prompt
    on a token that training follows with a blank line and a class's next method."""
    prompt = 'def f(x):\n    """Twice x.\n    >>> f(2)\n    4\n    """\n'
    engine = _Engine({prompt: "    return 2 * x\n", "x = ": "1"})
    assert complete(engine, [prompt, "x = "], max_tokens=8) == ["    return 2 * x\n", "1"]
    assert engine.seen == [prompt, "x = "]
    text = Path(textwrap.__file__).read_text() + Path(statistics.__file__).read_text()
    tok = Tokenizer.train([text], vocab_size=1024)
    ids = tok.encode(prompt + "    return 2 * x\n")
    pieces = [tok.decode([i]) for i in ids]
    closing = pieces.index(' """\n')  # quotes and newline are one token, then the body's indentation
    assert "".join(pieces[:closing + 1]) == prompt and pieces[closing + 1].isspace()


def test_corpus_source_leaves_out_test_suites_and_tables(tmp_path):
    root = tmp_path / "lib"
    for rel, text in [("json/__init__.py", "import os\n"), ("test/test_json.py", "x = 1\n"),
                      ("unittest/test/test_case.py", "y = 2\n"), ("idlelib/idle_test/h.py", "z = 3\n"),
                      ("test_support.py", "w = 4\n"), ("textwrap.py", "def wrap(): pass\n"),
                      ("site-packages/pkg/m.py", "v = 5\n"), ("encodings/cp1252.py", "t = (0x01,)\n"),
                      ("pydoc_data/topics.py", "topics = {}\n"), ("encodings_extra.py", "u = 6\n")]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "blob.bin").write_bytes(b"\xff\xfe\x00")
    target = corpus_source(root, tmp_path / "src" / "stdlib.jsonl")
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert sorted(r["path"] for r in rows) == ["encodings_extra.py", "json/__init__.py", "textwrap.py"]
    assert {r["path"]: r["text"] for r in rows}["textwrap.py"] == "def wrap(): pass\n"


def test_bits_per_byte_matches_perplexity(tmp_path):
    files = held_out_files()[:2]
    untrained_checkpoint(tmp_path, [f.read_text() for f in held_out_files()])
    scores = heldout_scores(tmp_path, files, seq_len=64)
    assert scores["bytes"] == sum(len(f.read_text().encode()) for f in files)
    nll = math.log(scores["perplexity"]) * scores["tokens"]
    assert math.isclose(scores["bits_per_byte"], nll / math.log(2) / scores["bytes"], rel_tol=1e-9)
    assert math.isclose(perplexity(tmp_path, files, seq_len=64), scores["perplexity"], rel_tol=1e-9)


def test_the_recipe_is_a_deepseek_v2_moe_with_mla():
    config = recipe()
    model = ModelConfig.preset(config.model.preset).replace(**config.model.overrides)
    assert model.is_moe and model.n_routed_experts > model.num_experts_per_tok and model.n_shared_experts
    assert model.first_k_dense_replace == 1 and model.kv_lora_rank < model.hidden_size  # MLA: a compressed latent
    assert model.yarn is not None
    assert config.data.fim_rate > 0  # the report shows an infill
    assert config.data.seq_len * 4 <= model.max_position_embeddings  # YaRN's stretch covers prompt + completion


def test_calibration_times_the_recipe_on_the_corpus_alone(stdlib_build, tmp_path, monkeypatch):
    """The calibration trains the recipe itself for a few steps, on the corpus only: the recipe's anneal build does
    not exist yet where it points (runs/quickstart/functions, relative to wherever the user is), and the calibration
    leaves nothing behind."""
    import dscoder.quickstart as qs

    assert recipe().data.anneal_fraction > 0  # the recipe anneals
    (tmp_path / "qs").mkdir()
    (tmp_path / "qs" / "data").symlink_to(stdlib_build, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    steps = qs._steps_for(60.0, tmp_path / "qs" / "data")
    assert 20 <= steps and 60.0 / steps > 0.005  # a step of this recipe takes milliseconds, not microseconds
    assert sorted(p.name for p in (tmp_path / "qs").iterdir()) == ["data"]


def test_recipe_trains_in_bf16_only_with_native_kernels(monkeypatch):
    import dscoder.quickstart as qs

    monkeypatch.setattr(qs, "_native_bf16", lambda: True)
    assert recipe().train.dtype == "bfloat16"
    monkeypatch.setattr(qs, "_native_bf16", lambda: False)
    assert recipe().train.dtype == "float32"
    assert recipe(["train.dtype=bfloat16"]).train.dtype == "bfloat16"  # an explicit override still wins


def test_export_stage_averages_the_last_checkpoints(tmp_path, monkeypatch):
    """The quickstart's model is the mean of the run's last AVERAGE_LAST checkpoints (all of them when it kept fewer)."""
    import shutil

    import dscoder
    import dscoder.quickstart as qs
    from dscoder.train import checkpoint as ckpt

    weights = []
    for step in (1, 2, 3):
        model = dscoder.build_model(dscoder.ModelConfig.preset("tiny"), seed=step)
        weights.append(model.state_dict()["model.embed_tokens.weight"])
        ckpt.save(tmp_path / "a" / "pretrain", step, model, torch.optim.AdamW(model.parameters()),
                  extra={"step": step}, meta={"model": model.config.to_hf_dict()}, keep=3)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for run, last, mean_of in (("a", 2, weights[1:]), ("b", 8, weights)):
        monkeypatch.setattr(qs, "AVERAGE_LAST", last)
        got = dscoder.load_model(qs.stage_export(tmp_path / run)).state_dict()["model.embed_tokens.weight"]
        torch.testing.assert_close(got, sum(mean_of) / len(mean_of))


def test_pretrain_stage_replans_its_steps_from_the_time_they_took(tmp_path, monkeypatch):
    """Planned for 1,000 steps of 0.1 s in 100 s, on a machine that turns out to take 0.2 s a step: the stage stops
    at a quarter of the way (step 250, 50 s) and re-plans to about 495 steps, so the half-way point has passed; it
    stops again at 70% of the new plan, before the recipe's anneal starts, re-plans, and ends within the budget. A
    resumed stage keeps the plan it finds."""
    import types

    import dscoder.quickstart as qs
    import dscoder.train.pretrain as pt

    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(qs, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    monkeypatch.setattr(qs, "_steps_for", lambda seconds, data: int(seconds / 0.1))
    calls = []

    def fake_pretrain(config, run, resume=False, max_steps=None):
        start = calls[-1][1] if calls else 0
        stop = config.train.steps if max_steps is None else max_steps
        calls.append((config.train.steps, stop, resume))
        assert max_steps is None or max_steps < config.anneal_start  # a re-planning stop comes before the anneal
        clock.now += 0.2 * (stop - start)

    monkeypatch.setattr(pt, "pretrain", fake_pretrain)
    result = qs.stage_pretrain(tmp_path, 100.0)
    assert [c[2] for c in calls] == [False, True, True]
    assert calls[0] == (1000, 250, False) and calls[1][1] == int(calls[1][0] * 0.7)  # the stop from the new plan
    assert 95 <= clock.now <= 100 and result["steps"] == calls[-1][0] == calls[-1][1] < 500
    assert json.loads((tmp_path / "pretrain" / "quickstart_steps.json").read_text())["steps"] == result["steps"]
    calls.clear()
    (tmp_path / "pretrain" / "checkpoints" / "step-000300").mkdir(parents=True)  # as if stopped at step 300
    assert qs.stage_pretrain(tmp_path, 100.0)["steps"] == result["steps"]
    assert calls == [(result["steps"], result["steps"], True)]
