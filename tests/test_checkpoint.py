"""HF checkpoint I/O: round trips, shards, dtypes, tied embeddings, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dscoder
from dscoder import CheckpointError, DscoderError


@pytest.fixture
def tiny_dir(tmp_path):
    model = dscoder.load_model("tiny", seed=0)
    dscoder.save_model(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_round_trip_is_exact_and_uses_hub_keys(tiny_dir):
    model, path = tiny_dir
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in keys
    assert not any(k.endswith("gate_up_proj") for k in keys)
    loaded = dscoder.load_model(path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    ids = torch.randint(0, 1024, (1, 9))
    torch.testing.assert_close(model(ids).logits, loaded(ids).logits, rtol=1e-6, atol=1e-6)
    assert not loaded.training  # like from_pretrained: eval mode
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "float32"
    # readable by others, as any shared checkpoint (safetensors alone would create its files 0600)
    assert {p.name: p.stat().st_mode & 0o777 for p in path.iterdir()} == {p.name: 0o644 for p in path.iterdir()}


def test_sharded_bf16_save_and_load(tmp_path):
    model = dscoder.load_model("tiny", seed=1)
    dscoder.save_model(model, tmp_path, dtype="bfloat16", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0].startswith("model-00001-of-")
    back = dscoder.load_model(tmp_path)
    assert back.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(back.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))
    fp32 = dscoder.load_model(tmp_path, dtype="float32")
    assert fp32.lm_head.weight.dtype == torch.float32
    # saving again unsharded removes the old shards and index
    dscoder.save_model(back, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]


def test_fused_expert_keys_load_too(tiny_dir, tmp_path):
    """transformers 5 may write stacked experts (mlp.experts.gate_up_proj); they load unchanged."""
    model, _ = tiny_dir
    out = tmp_path / "fused"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    ids = torch.randint(0, 1024, (1, 5))
    torch.testing.assert_close(dscoder.load_model(out)(ids).logits, model(ids).logits, rtol=1e-6, atol=1e-6)


def test_tied_embeddings(tmp_path):
    cfg = dscoder.ModelConfig.preset("tiny").replace(tie_word_embeddings=True)
    model = dscoder.load_model(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    dscoder.save_model(model, tmp_path)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    back = dscoder.load_model(tmp_path)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    assert torch.equal(back.lm_head.weight, model.lm_head.weight)


def _edit(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


@pytest.mark.parametrize("edit, needle", [
    (lambda t: t.pop("model.norm.weight"), "missing tensor 'model.norm.weight'"),
    (lambda t: t.pop("model.layers.2.mlp.experts.3.up_proj.weight"),
     "missing tensor 'model.layers.2.mlp.experts.3.up_proj.weight'"),
    (lambda t: t.__setitem__("model.layers.9.extra.weight", torch.zeros(2)), "unexpected tensor 'model.layers.9.extra"),
    (lambda t: t.__setitem__("model.norm.weight", torch.zeros(3)), "'model.norm.weight' has shape [3]; expected [64]"),
])
def test_bad_tensors_are_named(tiny_dir, edit, needle):
    _, path = tiny_dir
    _edit(path, edit)
    with pytest.raises(CheckpointError) as err:
        dscoder.load_model(path)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_bad_files(tiny_dir, tmp_path):
    _, path = tiny_dir
    with pytest.raises(DscoderError, match="no such checkpoint directory or preset"):
        dscoder.load_model(tmp_path / "nowhere")
    (path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        dscoder.load_model(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        dscoder.load_model(path)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-1.safetensors: shard listed"):
        dscoder.load_model(path)
    (path / "config.json").unlink()
    with pytest.raises(DscoderError, match="config.json: file not found"):
        dscoder.load_model(path)
    with pytest.raises(DscoderError, match="unknown dtype 'int3'"):
        dscoder.load_model("tiny", dtype="int3")


def test_cli_reports_bad_checkpoint_in_one_line(tiny_dir):
    _, path = tiny_dir
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_scaling"]["type"] = "ntk"
    (path / "config.json").write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, "-m", "dscoder.cli", "model", "info", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "rope_scaling.type" in proc.stderr and "Traceback" not in proc.stderr
