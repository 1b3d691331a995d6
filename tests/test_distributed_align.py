"""Alignment under torchrun: SFT and GRPO on 2 CPU ranks (DDP, FSDP2, FSDP2 + EP) equal one process with the same
global batch, in loss and gradient norm; the run writes one set of metrics and one export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import align_recipe, jsonl_rows, torchrun, write_lines
from dscoder.align.grpo import grpo
from dscoder.align.sft import sft
from dscoder.tokenizer import Tokenizer

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle"]


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft-dist")
    texts = [f"User: reverse: {a} {b}\n\nAssistant: {b} {a}" for a in WORDS for b in WORDS] * 3
    Tokenizer.train(texts, vocab_size=320).save(root / "tok")
    rows = []
    for i in range(24):
        a, b = WORDS[i % 8], WORDS[(i * 3 + 1) % 8]
        msgs = [{"role": "user", "content": f"reverse: {a} {b}"}, {"role": "assistant", "content": f"{b} {a}"}]
        if i % 3 == 0:  # conversations of different lengths: the ranks' rows hold different token counts
            msgs += [{"role": "user", "content": f"first: {a} {b}"}, {"role": "assistant", "content": a}]
        rows.append({"messages": msgs})
    write_lines(root / "chat.jsonl", rows)
    return root


def _sft_args(data: Path) -> list[str]:
    # packing off and a short length: rows of one or two conversations, so each rank's share has its own count of
    # assistant tokens (the loss must be the mean over the global batch's tokens, not a mean of the ranks' means)
    return [f"model.tokenizer={data / 'tok'}", f"data.path={data / 'chat.jsonl'}", "data.seq_len=48",
            "data.packing=false", "train.steps=3", "train.warmup_steps=1", "train.grad_accum=2", "train.ckpt_every=3",
            "train.export=true"]


@pytest.mark.parametrize("parallel", [[], ["parallel.strategy=fsdp"], ["parallel.strategy=fsdp", "parallel.ep=2"]],
                         ids=["ddp", "fsdp", "fsdp+ep"])
def test_sft_under_torchrun_equals_one_process(chat_data, tmp_path, parallel):
    sft(align_recipe("sft", *_sft_args(chat_data), "train.micro_batch=4"), tmp_path / "one")
    proc = torchrun("train", "sft", "--config", "sft-tiny", "--out", str(tmp_path / "two"), *_sft_args(chat_data),
                    "train.micro_batch=2", *parallel)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = jsonl_rows(tmp_path / "one" / "metrics.jsonl"), jsonl_rows(tmp_path / "two" / "metrics.jsonl")
    assert len(one) == len(two) == 3
    for key in ("loss", "aux_loss", "grad_norm"):
        assert max(abs(a[key] - b[key]) for a, b in zip(one, two)) <= 1e-4, (key, one, two)
    assert [r["assistant_tokens"] for r in one] == [r["assistant_tokens"] for r in two]
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["parallel"]["strategy"] == (parallel[0].split("=")[1] if parallel else "ddp")
    assert (tmp_path / "two" / "hf" / "config.json").is_file()


def _grpo_args() -> list[str]:
    # two mini-batches per pass and two passes: the sampling policy's log-probabilities, the ratio and the clip are
    # all exercised; the rollouts (64 completions) are generated half on each rank
    return ["train.steps=3", "train.warmup_steps=1", "train.ckpt_every=3", "grpo.mini_batches=2",
            "grpo.updates_per_batch=2", "grpo.loss_type=token"]


@pytest.mark.parametrize("parallel", [[], ["parallel.strategy=fsdp", "parallel.ep=2"]], ids=["ddp", "fsdp+ep"])
def test_grpo_under_torchrun_equals_one_process(tmp_path, parallel):
    grpo(align_recipe("grpo", *_grpo_args()), tmp_path / "one")
    proc = torchrun("train", "grpo", "--config", "grpo-tiny", "--out", str(tmp_path / "two"), *_grpo_args(),
                    *parallel)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = jsonl_rows(tmp_path / "one" / "metrics.jsonl"), jsonl_rows(tmp_path / "two" / "metrics.jsonl")
    assert len(one) == len(two) == 3
    # the same completions (each sampled with its own seed, whichever rank draws it) and the same updates
    for key in ("reward_mean", "response_length", "pass_rate"):
        assert [r[key] for r in one] == [r[key] for r in two], key
    for key in ("loss", "kl", "clip_frac", "grad_norm"):
        assert max(abs(a[key] - b[key]) for a, b in zip(one, two)) <= 1e-4, (key, one, two)
    assert (tmp_path / "two" / "hf" / "config.json").is_file()


def test_reward_under_torchrun_equals_one_process(tmp_path):
    """The reward model on 2 ranks with FSDP2 (the pairs made by rank 0 and shared, each rank scoring half of the
    global batch): the losses and gradient norms of one process; the full reward model is written once."""
    from dscoder.align.reward import load_reward_model, train_reward

    args = ["train.steps=3", "train.warmup_steps=1", "train.ckpt_every=3", "train.grad_accum=2"]
    train_reward(align_recipe("reward", *args, "train.micro_batch=8"), tmp_path / "one")
    proc = torchrun("train", "reward", "--config", "reward-tiny", "--out", str(tmp_path / "two"), *args,
                    "train.micro_batch=4", "parallel.strategy=fsdp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = jsonl_rows(tmp_path / "one" / "metrics.jsonl"), jsonl_rows(tmp_path / "two" / "metrics.jsonl")
    assert len(one) == len(two) == 3
    for key in ("loss", "accuracy", "grad_norm", "heldout_accuracy"):
        assert max(abs(a.get(key, 0) - b.get(key, 0)) for a, b in zip(one, two)) <= 1e-4, (key, one, two)
    a, b = load_reward_model(tmp_path / "one" / "reward_model"), load_reward_model(tmp_path / "two" / "reward_model")
    assert max((x - y).abs().max().item() for x, y in zip(a.state_dict().values(), b.state_dict().values())) < 1e-4


def test_parallel_settings_that_cannot_run_are_one_line(chat_data, tmp_path, capsys):
    """ep that the world does not divide (every rank says so), EP in one process, rows that do not split evenly."""
    from dscoder.align.recipe import rank_share
    from dscoder.cli import main
    from dscoder.errors import ConfigError
    from dscoder.train.pretrain import Dist

    proc = torchrun("train", "sft", "--config", "sft-tiny", "--out", str(tmp_path / "r"), *_sft_args(chat_data),
                    "parallel.ep=3")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("dscoder:")]
    assert len(lines) == 2 and set(lines) == {"dscoder: error: parallel.ep = 3: must divide the number of processes "
                                              "(2)"}, proc.stderr[-2000:]
    assert main(["train", "grpo", "--config", "grpo-tiny", "--out", str(tmp_path / "g"), "parallel.ep=2"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "dscoder: error: parallel.ep = 2: expert parallelism needs torchrun"
    with pytest.raises(ConfigError, match="= 6 does not split evenly over 4 processes"):
        rank_share(6, Dist(1, 4, 1, "cpu"), "rows per step")
    assert rank_share(8, Dist(1, 4, 1, "cpu"), "rows per step") == slice(2, 4)
