"""GRPO: the objective against a hand computation, advantages, the built-in task learned, sandbox rewards, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import align_recipe, jsonl_rows
from dscoder.errors import DscoderError
from dscoder.tokenizer import Tokenizer
from dscoder.align.grpo import group_advantages, grpo, grpo_loss

ROOT = Path(__file__).resolve().parents[1]


def recipe(*overrides):
    return align_recipe("grpo", *overrides)


def rows(run: Path) -> list[dict]:
    return jsonl_rows(run / "metrics.jsonl")


def test_objective_matches_a_hand_computed_example():
    logp = torch.tensor([[-1.0, -0.5], [-2.0, -1.0]])
    old = torch.tensor([[-1.2, -0.5], [-1.5, -1.0]])
    ref = torch.tensor([[-1.1, -0.6], [-2.0, -0.9]])
    adv = torch.tensor([1.0, -0.5])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    eps, beta = 0.2, 0.1
    # by hand, token by token: -min(ρA, clip(ρ)A) + β (e^δ - δ - 1), δ = ref - logp
    k3 = math.exp(-0.1) + 0.1 - 1                       # both tokens of sequence 0 have δ = -0.1
    t00 = -min(math.exp(0.2) * 1.0, 1.2 * 1.0) + beta * k3  # ρ = e^0.2 > 1.2: clipped
    t01 = -min(1.0, 1.0) + beta * k3                      # ρ = 1
    t10 = -min(math.exp(-0.5) * -0.5, 0.8 * -0.5) + 0.0   # ρ = e^-0.5 < 0.8 and A < 0: clipped; δ = 0
    want = {"grpo": ((t00 + t01) / 2 + t10) / 2, "token": (t00 + t01 + t10) / 3, "dr_grpo": (t00 + t01 + t10) / (2 * 4)}
    for loss_type, value in want.items():
        loss, stats = grpo_loss(logp, old, ref, adv, mask, epsilon=eps, beta=beta, loss_type=loss_type,
                                max_completion_length=4)
        assert loss.item() == pytest.approx(value, abs=1e-6), loss_type
        assert stats["clip_frac"] == pytest.approx(2 / 3) and stats["kl"] == pytest.approx(2 * k3 / 3, abs=1e-7)
    # asymmetric clipping (ε_high) lets token (0, 0) through: ρ = e^0.2 < 1.3
    loss, _ = grpo_loss(logp, old, None, adv, mask, epsilon=eps, epsilon_high=0.3, loss_type="token")
    assert loss.item() == pytest.approx((-math.exp(0.2) - 1.0 - 0.8 * -0.5) / 3, abs=1e-6)
    # with ρ = 1 the gradient is -A/|o_i| per token (the policy-gradient form)
    lp = logp.clone().requires_grad_(True)
    grpo_loss(lp, lp.detach(), None, adv, mask, loss_type="grpo")[0].backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-0.25, -0.25], [0.25, 0.0]]))


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0, 3.0])
    adv = group_advantages(r, 2)
    s = math.sqrt(0.5)  # unbiased std of (1, 0)
    torch.testing.assert_close(adv[:4], torch.tensor([0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.0, 0.0]))
    torch.testing.assert_close(group_advantages(r, 4, scale="none"), r - r.view(2, 4).mean(1).repeat_interleave(4))


def test_mean_reward_rises_on_the_builtin_task(tmp_path):
    summary = grpo(recipe("train.steps=50", "train.ckpt_every=50"), tmp_path / "run")
    m = rows(tmp_path / "run")
    assert len(m) == 50 and {"step", "reward_mean", "reward_std", "pass_rate", "kl", "clip_frac", "response_length",
                             "rollout_tokens_per_s", "update_s"} <= set(m[0])
    start = sum(r["reward_mean"] for r in m[:5]) / 5
    end = sum(r["reward_mean"] for r in m[-5:]) / 5
    assert start < 0.12 and end > start + 0.2 and end > 3 * start, (start, end)  # chance is 1/16
    assert m[-1]["kl"] > 0 and 0 < m[-1]["response_length"] <= 4
    assert (Path(summary["export"]) / "config.json").is_file()


def test_resume_reproduces_the_run(tmp_path):
    over = ["train.steps=6", "train.ckpt_every=3", "train.export=false", "grpo.updates_per_batch=2",
            "grpo.mini_batches=2", "grpo.loss_type=dr_grpo"]
    full = grpo(recipe(*over), tmp_path / "full")
    grpo(recipe(*over), tmp_path / "cut", max_steps=3)
    resumed = grpo(recipe(*over), tmp_path / "cut", resume=True)
    assert resumed["last"]["reward_mean"] == full["last"]["reward_mean"]
    assert resumed["last"]["loss"] == pytest.approx(full["last"]["loss"], abs=1e-6)
    assert [r["step"] for r in rows(tmp_path / "cut")] == list(range(1, 7))


@pytest.fixture(scope="module")
def code_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo-code")
    texts = ["def add(a, b):\n    return a + b\n", "def sub(a, b):\n    return a - b\n"] * 20
    Tokenizer.train(texts, vocab_size=300).save(root / "tok")
    problems = [{"task_id": "add", "prompt": "def add(a, b):\n", "test": "def check(f):\n    assert f(1, 2) == 3\n",
                 "entry_point": "add"},
                {"task_id": "mbpp", "prompt": "def sub(a, b):\n", "test_list": ["assert sub(3, 1) == 2"]}]
    (root / "problems.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    return root


def test_sandboxed_test_rewards_run_end_to_end(code_setup, tmp_path):
    summary = grpo(recipe(f"data.prompts={code_setup / 'problems.jsonl'}", f"model.tokenizer={code_setup / 'tok'}",
                          "train.steps=1", "grpo.group_size=2", "grpo.prompts_per_step=2", "grpo.max_new_tokens=6",
                          "grpo.updates_per_batch=1"), tmp_path / "run")
    last = summary["last"]
    assert last["pass_rate"] == 0.0 and last["reward_mean"] == 0.0  # a random model does not pass; the loop runs
    assert Tokenizer.load(summary["export"]).vocab_size == Tokenizer.load(code_setup / "tok").vocab_size


def test_bad_input(code_setup, tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "def f():\n"}) + "\n")
    with pytest.raises(DscoderError, match=r"p.jsonl:1: prompt without tests"):
        grpo(recipe(f"data.prompts={tmp_path / 'p.jsonl'}", f"model.tokenizer={code_setup / 'tok'}"), tmp_path / "a")
    with pytest.raises(DscoderError, match="grpo.rewards"):
        grpo(recipe("grpo.rewards={style = 1.0}"), tmp_path / "b")
    with pytest.raises(DscoderError, match="grpo.reward_model: rewards include 'model'"):
        grpo(recipe("grpo.rewards={model = 1.0}"), tmp_path / "c")
    with pytest.raises(DscoderError, match="group_size: expected at least 2"):
        grpo(recipe("grpo.group_size=1"), tmp_path / "d")
    # a reward model of another vocabulary (the tokenizer's 300 tokens vs the built-in task's 16)
    from dscoder.config import ModelConfig
    from dscoder.align.reward import RewardModel, save_reward_model

    rm = RewardModel(ModelConfig.preset("tiny").replace(vocab_size=300))
    rm.init_weights()
    save_reward_model(rm, tmp_path / "rm")
    with pytest.raises(DscoderError, match="vocabulary has 300 tokens; the policy's has 16"):
        grpo(recipe("grpo.rewards={tests = 1.0, model = 0.5}", f"grpo.reward_model={tmp_path / 'rm'}"), tmp_path / "e")


def test_cli_commands(tmp_path, capsys):
    import argparse

    from dscoder.align.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["grpo", "--config", str(ROOT / "configs" / "grpo-tiny.toml"), "--out",
                              str(tmp_path / "run"), "train.steps=2", "train.export=false"])
    assert args.func(args) == 0
    assert "grpo: step 2: reward" in capsys.readouterr().out
    args = parser.parse_args(["sft", "--config", str(ROOT / "configs" / "sft-tiny.toml"), "--out", str(tmp_path / "s")])
    with pytest.raises(DscoderError, match="model.tokenizer"):
        args.func(args)
