"""LoRA: the adapter in PEFT's format loads onto transformers' model with the logits of dscoder's merged export;
the LoRA forward equals the merged model's; a LoRA SFT run resumes exactly; a target that does not exist is one
line."""

from __future__ import annotations

import json

import pytest
import torch

import dscoder
from dscoder import ModelConfig
from dscoder.train.lora import LoRAExperts, LoRALinear, LoRASection, apply_lora, merge_lora, save_adapter
from dscoder.errors import CheckpointError, ConfigError

BASE = dict(vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=4, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
            n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, first_k_dense_replace=1,
            max_position_embeddings=128, q_lora_rank=16, bos_token_id=0, eos_token_id=1)
ALL = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(overrides=None, **lora):
    model = dscoder.build_model(ModelConfig(**{**BASE, **(overrides or {})}), seed=0)
    section = LoRASection(**{"rank": 4, "alpha": 8.0, **lora})
    section.validate()
    apply_lora(model, section)
    with torch.no_grad():  # B starts at zero: give the adapters a visible effect
        g = torch.Generator().manual_seed(3)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval(), section


def ids(batch=2, length=11):
    return torch.randint(0, BASE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(1))


def test_only_adapters_train_and_merge_equals_lora_forward():
    model, _ = lora_model(targets=ALL, experts=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any(isinstance(m, LoRAExperts) for m in model.modules())
    x = ids()
    with torch.no_grad():
        before = model(x).logits
        merge_lora(model)
        assert not any(isinstance(m, (LoRALinear, LoRAExperts)) for m in model.modules())
        after = model(x).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_experts_reference_path_uses_the_adapter():
    model, _ = lora_model(targets=["gate_proj", "up_proj", "down_proj"], experts=True)
    experts = model.model.layers[1].mlp.experts
    x = torch.randn(7, BASE["hidden_size"])
    weights, chosen, _ = model.model.layers[1].mlp.gate(x)
    with torch.no_grad():
        torch.testing.assert_close(experts(x, weights, chosen), experts.forward_reference(x, weights, chosen),
                                   atol=1e-5, rtol=1e-5)
        plain = experts.merged()
        torch.testing.assert_close(plain(x, weights, chosen), experts(x, weights, chosen), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["attention", "experts"])
def test_adapter_loads_in_peft_with_the_merged_logits(tmp_path, variant):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    if variant == "attention":
        model, section = lora_model(targets=ALL[:5])
    else:
        # peft (0.21, transformers 5) maps gate/up/down_proj targets to the fused routed experts only: a model
        # without dense layers or shared experts, so every MLP target is a routed expert
        model, section = lora_model({"first_k_dense_replace": 0, "n_shared_experts": 0},
                                    targets=ALL, experts=True)
    base_dir, merged_dir = tmp_path / "base", tmp_path / "merged"
    base = dscoder.build_model(model.config, seed=0)
    dscoder.save_model(base, base_dir)
    save_adapter(model, section, tmp_path / "adapter", str(base_dir))
    dscoder.save_model(merge_lora(model), merged_dir)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    hf = transformers.DeepseekV2ForCausalLM.from_pretrained(base_dir).eval()
    adapted = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ours = dscoder.load_model(merged_dir)
    x = ids()
    with torch.no_grad():
        theirs_logits = adapted(x).logits
        ours_logits = ours(x).logits
        plain_logits = transformers.DeepseekV2ForCausalLM.from_pretrained(base_dir).eval()(x).logits
    assert (theirs_logits - plain_logits).abs().max() > 1e-2  # the adapter changed the model
    assert (theirs_logits - ours_logits).abs().max() <= 1e-4


def test_bad_targets_are_one_line():
    with pytest.raises(ConfigError, match="no module is named 'qkv'"):
        LoRASection(rank=4, targets=["qkv"]).validate()
    model = dscoder.build_model(ModelConfig(**BASE), seed=0)  # q_lora_rank: no q_proj
    with pytest.raises(ConfigError, match="no module named 'q_proj'"):
        apply_lora(model, LoRASection(rank=4, targets=["q_proj"]))
    with pytest.raises(ConfigError, match="lora.experts"):
        LoRASection(rank=4, targets=["q_a_proj"], experts=True).validate()
    with pytest.raises(ConfigError, match="lora.dropout"):
        LoRASection(rank=4, targets=["gate_proj"], experts=True, dropout=0.1).validate()


# ----- LoRA in SFT runs -------------------------------------------------------------------------------------------
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle"]


@pytest.fixture(scope="module")
def chat_setup(tmp_path_factory):
    from conftest import write_lines
    from dscoder.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("lora-sft")
    texts = [f"User: reverse: {a} {b}\n\nAssistant: {b} {a}" for a in WORDS for b in WORDS] * 3
    Tokenizer.train(texts, vocab_size=320).save(root / "tok")
    rows = [{"messages": [{"role": "user", "content": f"reverse: {a} {b}"},
                          {"role": "assistant", "content": f"{b} {a}"}]} for a in WORDS for b in WORDS[:3]]
    return root / "tok", write_lines(root / "chat.jsonl", rows)


def lora_recipe(chat_setup, *overrides):
    from conftest import align_recipe

    tok, data = chat_setup
    return align_recipe("sft", f"model.tokenizer={tok}", f"data.path={data}", "data.seq_len=64", "train.steps=6",
                        "train.ckpt_every=3", "train.micro_batch=2", "train.lr=1e-2", "lora.rank=4",
                        "lora.alpha=8", "lora.dropout=0.1", *overrides)


def test_lora_sft_resumes_exactly_and_exports_merged(chat_setup, tmp_path):
    from safetensors.torch import load_file

    from dscoder.align.sft import sft
    from dscoder.cli import main

    full = sft(lora_recipe(chat_setup), tmp_path / "full")
    assert full["last_loss"] < full["first_loss"]
    sft(lora_recipe(chat_setup), tmp_path / "cut", max_steps=3)
    resumed = sft(lora_recipe(chat_setup), tmp_path / "cut", resume=True)
    assert resumed["last_loss"] == full["last_loss"]  # exact: weights, optimizer, data order, dropout's RNG
    with pytest.raises(CheckpointError, match="saved with lora"):  # another [lora] table: one line
        sft(lora_recipe(chat_setup, "train.steps=9", "lora.rank=2"), tmp_path / "cut", resume=True)
    a, b = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "base_model.model.model.layers.0.self_attn.kv_b_proj.lora_A.weight" in a
    # the base stayed frozen: the merged export minus the adapter's update is the initial model
    merged = dscoder.load_model(full["export"])
    cfg = lora_recipe(chat_setup)
    from dscoder.align.recipe import build_policy, load_tokenizer

    base = build_policy(cfg, load_tokenizer(cfg))
    key = "model.layers.0.self_attn.kv_b_proj"
    delta = 2.0 * a[f"base_model.model.{key}.lora_B.weight"] @ a[f"base_model.model.{key}.lora_A.weight"]
    torch.testing.assert_close(merged.get_submodule(key).weight, base.get_submodule(key).weight + delta)
    torch.testing.assert_close(merged.model.embed_tokens.weight, base.model.embed_tokens.weight, atol=0, rtol=0)
    # dscoder export: a LoRA run needs --merge-lora (one line), which writes the same merged model
    assert main(["export", str(tmp_path / "full"), "--out", str(tmp_path / "plain")]) != 0
    assert main(["export", str(tmp_path / "full"), "--out", str(tmp_path / "again"), "--merge-lora"]) == 0
    again = dscoder.load_model(tmp_path / "again")
    torch.testing.assert_close(again.get_submodule(key).weight, merged.get_submodule(key).weight, atol=0, rtol=0)


def test_lora_recipe_faults_are_one_line(chat_setup, tmp_path, capsys):
    from dscoder.cli import main

    tok, data = chat_setup
    args = ["train", "sft", "--config", "sft-tiny", "--out", str(tmp_path / "r"), f"model.tokenizer={tok}",
            f"data.path={data}", "train.steps=1", "lora.rank=4"]
    assert main([*args, "lora.targets=q_proj,qkv"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "qkv" in err[0], err
    assert main([*args, "model.q_lora_rank=16", "lora.targets=q_proj"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no module named 'q_proj'" in err[0], err
    assert main([*args, "lora.bogus=1"]) != 0
    assert "lora.bogus" in capsys.readouterr().err


def test_lora_sft_on_the_command_line(chat_setup, tmp_path, capsys):
    from dscoder.cli import main

    tok, data = chat_setup
    out = tmp_path / "run"
    assert main(["train", "sft", "--config", "sft-lora-tiny", "--out", str(out), f"model.tokenizer={tok}",
                 f"data.path={data}", "data.seq_len=64", "train.steps=2", "train.warmup_steps=1"]) == 0
    assert "LoRA adapter" in capsys.readouterr().out
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "hf" / "config.json").is_file()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 8


def test_packaged_lora_recipe_parses():
    from dscoder.align.recipe import load_recipe
    from dscoder.align.sft import SFTData, SFTSection

    cfg = load_recipe("sft-lora-tiny", [], "sft", SFTData, SFTSection)
    assert cfg.lora.enabled and cfg.lora.scaling == 2.0 and "kv_b_proj" in cfg.lora.targets
    assert cfg.to_dict()["lora"]["rank"] == 8
