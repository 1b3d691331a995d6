"""Reward model: the Bradley-Terry loss by hand, execution pairs ranked on held-out problems, save/load, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import align_recipe, jsonl_rows
from dscoder.errors import DscoderError
from dscoder.tokenizer import Tokenizer
from dscoder.align.reward import bradley_terry_loss, load_reward_model, problem_from_row, train_reward


def recipe(*overrides):
    return align_recipe("reward", *overrides)


def test_bradley_terry_loss_by_hand():
    rc, rr = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.5])
    want = (math.log1p(math.exp(-(1.0 - 0.0 - 0.25))) + math.log1p(math.exp(-(0.5 - 1.5 - 0.25)))) / 2
    assert bradley_terry_loss(rc, rr, 0.25).item() == pytest.approx(want, abs=1e-7)
    centred = want + 0.01 * ((1.0 + 0.0) ** 2 + (0.5 + 1.5) ** 2) / 2
    assert bradley_terry_loss(rc, rr, 0.25, center=0.01).item() == pytest.approx(centred, abs=1e-7)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "run"
    return out, train_reward(recipe("train.steps=40", "train.ckpt_every=40"), out)


def test_execution_pairs_rank_heldout_passing_above_failing(trained):
    out, summary = trained
    # 16 built-in problems x 6 programs run in the sandbox: 2 pass and 4 fail per problem -> 8 pairs per problem
    assert summary["programs"] == 96 and summary["passed"] == 32
    assert summary["heldout_pairs"] == 32 and summary["train_pairs"] == 96  # 4 whole problems held out
    assert summary["heldout_accuracy"] >= 0.85 > summary["heldout_accuracy_start"] + 0.3, summary
    rows = jsonl_rows(out / "metrics.jsonl")
    assert rows[-1]["heldout_accuracy"] == summary["heldout_accuracy"] and rows[-1]["loss"] < rows[0]["loss"]
    pair = json.loads((out / "pairs.jsonl").read_text().splitlines()[0])
    assert "+" in pair["chosen"].split("return")[1]


def test_saved_reward_model_scores_the_same_and_checks_vocabulary(trained):
    out, summary = trained
    rm = load_reward_model(summary["reward_model"])
    tok = Tokenizer.load(summary["reward_model"])
    good = tok.encode('def add(a, b):\n    """Return the sum of a and b."""\n    return a + b\n', add_bos=True)
    bad = tok.encode('def add(a, b):\n    """Return the sum of a and b."""\n    return a - b\n', add_bos=True)
    r_good, r_bad = rm.score_ids([good + [tok.eos_id], bad + [tok.eos_id]])
    assert r_good > r_bad
    with pytest.raises(DscoderError, match="vocabulary has 320 tokens; the policy's has 1024"):
        load_reward_model(summary["reward_model"], vocab_size=1024)
    with pytest.raises(DscoderError, match="not a dscoder reward model"):
        load_reward_model(out)


def test_preference_jsonl_and_bad_input(tmp_path, trained):
    out, summary = trained
    tok = summary["reward_model"]
    good = [{"prompt": f"def f{i}(a, b):\n", "chosen": "    return a + b\n", "rejected": "    return a - b\n"}
            for i in range(8)]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good))
    s = train_reward(recipe("data.problems=", f"data.pairs={tmp_path / 'prefs.jsonl'}", f"model.tokenizer={tok}",
                            "train.steps=2", "train.export=false"), tmp_path / "p")
    assert s["train_pairs"] == 6 and s["heldout_pairs"] == 2
    for line, message in ((json.dumps({"chosen": "x"}), r"bad.jsonl:1: expected \{\"prompt\"\?, \"chosen\""),
                          (json.dumps({"chosen": "x", "rejected": ["y"]}), "must all be strings or all chat message lists"),
                          ("{oops", "bad.jsonl:1: not valid JSON")):
        (tmp_path / "bad.jsonl").write_text(line + "\n")
        with pytest.raises(DscoderError, match=message):
            train_reward(recipe("data.problems=", f"data.pairs={tmp_path / 'bad.jsonl'}", f"model.tokenizer={tok}"),
                         tmp_path / f"bad{len(line)}")
    with pytest.raises(DscoderError, match=r"x.jsonl:3: prompt without tests"):
        problem_from_row({"prompt": "def f():"}, "x.jsonl:3")


def test_policy_from_an_hf_checkpoint_takes_its_weights_and_a_fresh_head(tmp_path):
    """model.init: the checkpoint's tensors become the reward model's (one copy), the score head is initialised,
    and an override that changes a weight's shape is a clear error."""
    import dscoder
    from dscoder.errors import ConfigError
    from dscoder.align.recipe import build_policy
    from dscoder.align.reward import RewardModel

    src = dscoder.build_model(dscoder.ModelConfig.preset("tiny"), seed=3)
    dscoder.save_model(src, tmp_path / "hf")
    config = recipe(f"model.init={tmp_path / 'hf'}", "model.preset=''", "model.aux_loss_alpha=0.05")
    model = build_policy(config, None, RewardModel)
    assert model.config.aux_loss_alpha == 0.05 and model.score.weight.device.type == "cpu"
    assert 0 < model.score.weight.std().item() < 0.1  # initialised (normal, initializer_range), not empty memory
    for key, value in src.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)
    ids = torch.randint(0, src.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, src.eval()(ids).logits)
    with pytest.raises(ConfigError, match="change the shapes"):
        build_policy(recipe(f"model.init={tmp_path / 'hf'}", "model.preset=''", "model.moe_intermediate_size=8"),
                     None, RewardModel)
