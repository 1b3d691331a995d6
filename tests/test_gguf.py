"""GGUF export: read back with the gguf package, every tensor equal to the source (MLA split, stacked experts,
f16/bf16 exact, q8_0 within its step), the deepseek2 metadata, the embedded tokenizer, and one-line refusals."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, tiny_model
from safetensors.torch import load_file, save_file

import dscoder
from dscoder.cli import main
from dscoder.errors import DscoderError
from dscoder import gguf_export
from dscoder.gguf_export import pre_tokenizer_name, split_kv_b
from dscoder.tokenizer import DEEPSEEK_SPLITS, Tokenizer

Q = gguf.GGMLQuantizationType


def _export(capsys, source: Path, out: Path, *extra: str) -> Path:
    assert main(["export", str(source), "--out", str(out), "--format", "gguf", *extra]) == 0, capsys.readouterr()
    capsys.readouterr()
    return out


def _field(reader: gguf.GGUFReader, key: str):
    field = reader.get_field(key)
    assert field is not None, key
    return field.contents()


def _tensors(reader: gguf.GGUFReader) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in reader.tensors}


def _values(t: gguf.ReaderTensor) -> torch.Tensor:
    """The stored values in torch order, as float32 (bf16 widened exactly, q8_0 dequantized)."""
    shape = tuple(int(n) for n in reversed(t.shape))
    if t.tensor_type == Q.BF16:
        bits = np.asarray(t.data).view(np.int16).reshape(shape)
        return torch.from_numpy(bits.copy()).view(torch.bfloat16).float()
    return torch.from_numpy(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).astype(np.float32))


def _expected(checkpoint: Path) -> tuple[dscoder.ModelConfig, dict[str, torch.Tensor]]:
    """The GGUF tensors, derived independently from the HF files: name → fp32 values."""
    config = dscoder.ModelConfig.from_json_file(checkpoint / "config.json")
    sd = load_file(checkpoint / "model.safetensors")
    H, dn = config.num_attention_heads, config.qk_nope_head_dim
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    plain = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.kv_a_proj_with_mqa":
             "attn_kv_a_mqa", "self_attn.kv_a_layernorm": "attn_kv_a_norm", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp", "mlp.shared_experts.gate_proj":
             "ffn_gate_shexp", "mlp.shared_experts.up_proj": "ffn_up_shexp", "mlp.shared_experts.down_proj":
             "ffn_down_shexp"}
    for i in range(config.num_hidden_layers):
        for hf, name in plain.items():
            if f"model.layers.{i}.{hf}.weight" in sd:
                out[f"blk.{i}.{name}.weight"] = sd[f"model.layers.{i}.{hf}.weight"]
        kv_b = sd[f"model.layers.{i}.self_attn.kv_b_proj.weight"].view(H, -1, config.kv_lora_rank)
        out[f"blk.{i}.attn_k_b.weight"] = kv_b[:, :dn].transpose(1, 2)
        out[f"blk.{i}.attn_v_b.weight"] = kv_b[:, dn:]
        if config.is_moe_layer(i):
            for proj, name in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"),
                               ("down_proj", "ffn_down_exps")):
                out[f"blk.{i}.{name}.weight"] = torch.stack(
                    [sd[f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"] for e in range(config.n_routed_experts)])
    return config, {k: v.float() for k, v in out.items()}


def test_f16_reads_back_equal_to_the_source(tiny_checkpoint, tmp_path, capsys):
    out = _export(capsys, tiny_checkpoint, tmp_path / "tiny.gguf")  # --type f16 is the default
    reader = gguf.GGUFReader(out)
    config, expected = _expected(tiny_checkpoint)
    tensors = _tensors(reader)
    assert set(tensors) == set(expected)
    for name, want in expected.items():
        t = tensors[name]
        if want.dim() == 1 or name.endswith("ffn_gate_inp.weight"):
            assert t.tensor_type == Q.F32, name  # norms and the router stay f32
            assert torch.equal(_values(t), want), name
        else:
            assert t.tensor_type == Q.F16, name
            assert torch.equal(_values(t), want.half().float()), name
    # the MLA split reconstructs kv_b_proj
    for i in range(config.num_hidden_layers):
        k_b = _values(tensors[f"blk.{i}.attn_k_b.weight"])  # [H, r, dn]
        v_b = _values(tensors[f"blk.{i}.attn_v_b.weight"])  # [H, dv, r]
        rebuilt = torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(-1, config.kv_lora_rank)
        kv_b = load_file(tiny_checkpoint / "model.safetensors")[f"model.layers.{i}.self_attn.kv_b_proj.weight"]
        assert torch.equal(rebuilt, kv_b.half().float())
    assert [int(n) for n in tensors["blk.1.ffn_up_exps.weight"].shape] == [config.hidden_size,
                                                                          config.moe_intermediate_size,
                                                                          config.n_routed_experts]
    assert not any(f"blk.{i}.ffn_gate_exps.weight" in tensors for i in range(config.first_k_dense_replace))

    a = "deepseek2."
    want = {"general.architecture": "deepseek2", "general.file_type": gguf.LlamaFileType.MOSTLY_F16,
            a + "block_count": config.num_hidden_layers, a + "context_length": config.max_position_embeddings,
            a + "embedding_length": config.hidden_size, a + "feed_forward_length": config.intermediate_size,
            a + "vocab_size": config.vocab_size,
            a + "attention.head_count": config.num_attention_heads, a + "attention.head_count_kv": 1,
            a + "attention.kv_lora_rank": config.kv_lora_rank,
            # no low-rank query: 0, which llama.cpp needs for a layer count other than Lite's (it refuses a missing key)
            a + "attention.q_lora_rank": 0,
            a + "attention.key_length": config.kv_lora_rank + config.qk_rope_head_dim,
            a + "attention.value_length": config.kv_lora_rank,
            a + "attention.key_length_mla": config.qk_nope_head_dim + config.qk_rope_head_dim,
            a + "attention.value_length_mla": config.v_head_dim,
            a + "rope.dimension_count": config.qk_rope_head_dim, a + "rope.freq_base": config.rope_theta,
            a + "rope.scaling.type": "yarn", a + "rope.scaling.factor": config.rope_scaling["factor"],
            a + "rope.scaling.original_context_length": config.rope_scaling["original_max_position_embeddings"],
            a + "leading_dense_block_count": config.first_k_dense_replace,
            a + "expert_count": config.n_routed_experts, a + "expert_used_count": config.num_experts_per_tok,
            a + "expert_shared_count": config.n_shared_experts,
            a + "expert_feed_forward_length": config.moe_intermediate_size,
            a + "expert_weights_scale": config.routed_scaling_factor, a + "expert_weights_norm": False,
            a + "expert_gating_func": gguf.ExpertGatingFuncType.SOFTMAX}
    for key, value in want.items():
        assert _field(reader, key) == pytest.approx(value) if isinstance(value, float) else \
            _field(reader, key) == value, key
    assert _field(reader, a + "rope.scaling.yarn_log_multiplier") == pytest.approx(
        0.1 * config.rope_scaling["mscale_all_dim"])
    assert _field(reader, a + "attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)

    tok = Tokenizer.load(tiny_checkpoint)
    data = json.loads((tiny_checkpoint / "tokenizer.json").read_text())
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "deepseek-v3"  # dscoder trains with DeepSeek-V3's splits
    assert _field(reader, "tokenizer.ggml.tokens") == [tok.id_to_token(i) for i in range(tok.vocab_size)]
    assert _field(reader, "tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m)
                                                       for m in data["model"]["merges"]]
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[tok.bos_id] == types[tok.fim_begin_id] == gguf.TokenType.CONTROL
    assert types[tok.vocab_size - 1] == gguf.TokenType.NORMAL
    for key, value in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id), ("padding_token_id", tok.pad_id),
                       ("fim_pre_token_id", tok.fim_begin_id), ("fim_suf_token_id", tok.fim_hole_id),
                       ("fim_mid_token_id", tok.fim_end_id), ("add_bos_token", True)):
        assert _field(reader, "tokenizer.ggml." + key) == value, key
    assert _field(reader, "tokenizer.chat_template") == tok.chat_template


def test_bf16_exact_and_q8_0_within_its_step(tiny_checkpoint, tmp_path, capsys):
    _, expected = _expected(tiny_checkpoint)
    bf16 = _tensors(gguf.GGUFReader(_export(capsys, tiny_checkpoint, tmp_path / "b.gguf", "--type", "bf16")))
    q8 = gguf.GGUFReader(_export(capsys, tiny_checkpoint, tmp_path / "q.gguf", "--type", "q8_0"))
    assert _field(q8, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    q8 = _tensors(q8)
    for name, want in expected.items():
        if bf16[name].tensor_type == Q.F32:
            assert torch.equal(_values(bf16[name]), want) and q8[name].tensor_type == Q.F32, name
            continue
        assert bf16[name].tensor_type == Q.BF16 and torch.equal(_values(bf16[name]), want.bfloat16().float()), name
        got = _values(q8[name])
        if want.shape[-1] % 32:  # rows not made of 32-blocks: f16, as llama.cpp's converter falls back
            assert q8[name].tensor_type == Q.F16 and torch.equal(got, want.half().float()), name
            continue
        assert q8[name].tensor_type == Q.Q8_0, name
        blocks = want.reshape(-1, 32)
        step = blocks.abs().amax(dim=1, keepdim=True) / 127  # one int8 step of each block
        err = (got.reshape(-1, 32) - blocks).abs()
        # half a step, plus the f16 rounding of the block scale (2^-11 relative) over up to 127 steps
        assert (err <= step * (0.5 + 127 * 2**-11) + 1e-7).all(), (name, (err / step.clamp_min(1e-12)).max())
    assert q8["blk.0.attn_k_b.weight"].tensor_type == Q.F16  # qk_nope_head_dim 16 < 32 in the tiny preset


def test_stacked_expert_layout_and_a_padded_vocabulary(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """A checkpoint holding dscoder's own stacked experts (transformers 5's gate_up_proj layout), converted a few
    rows at a time, gives the same file data as the hub's per-expert layout converted whole; embeddings past the
    tokenizer become UNUSED [PAD] tokens."""
    reference = _tensors(gguf.GGUFReader(_export(capsys, tiny_checkpoint, tmp_path / "hub.gguf")))
    stacked = tmp_path / "stacked"
    stacked.mkdir()
    for f in tiny_checkpoint.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, stacked / f.name)
    model = dscoder.load_model(tiny_checkpoint)
    assert any(k.endswith("experts.gate_up_proj") for k in model.state_dict())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, stacked / "model.safetensors")
    monkeypatch.setattr(gguf_export, "_CHUNK_ELEMENTS", 200)  # a few rows per piece
    got = _tensors(gguf.GGUFReader(_export(capsys, stacked, tmp_path / "stacked.gguf")))
    assert set(got) == set(reference)
    for name in reference:
        assert np.array_equal(np.asarray(got[name].data), np.asarray(reference[name].data)), name

    tok = Tokenizer.load(tiny_checkpoint)
    padded = tmp_path / "padded"
    dscoder.save_model(tiny_model(vocab_size=tok.vocab_size + 8), padded)
    tok.save(padded)
    reader = gguf.GGUFReader(_export(capsys, padded, tmp_path / "padded.gguf"))
    tokens, types = _field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == tok.vocab_size + 8 and tokens[-1] == f"[PAD{tok.vocab_size + 7}]"
    assert types[-8:] == [gguf.TokenType.UNUSED] * 8


def test_a_training_run_exports_as_its_hf_export_does(stdlib_build, tmp_path, capsys):
    from dscoder.train.config import TrainConfig
    from dscoder.train.pretrain import pretrain

    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    pretrain(TrainConfig.load(root / "configs" / "tiny.toml",
                              [f"data.path={stdlib_build}", "data.seq_len=32", "train.micro_batch=2",
                               "train.steps=1", "train.ckpt_every=1"]), run)
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    from_run = _tensors(gguf.GGUFReader(_export(capsys, run, tmp_path / "run.gguf", "--type", "q8_0")))
    from_hf = _tensors(gguf.GGUFReader(_export(capsys, tmp_path / "hf", tmp_path / "hf.gguf", "--type", "q8_0")))
    assert set(from_run) == set(from_hf)
    for name in from_hf:
        assert np.array_equal(np.asarray(from_run[name].data), np.asarray(from_hf[name].data)), name


def _variant(tiny_checkpoint: Path, where: Path, **overrides) -> Path:
    dscoder.save_model(tiny_model(vocab_size=Tokenizer.load(tiny_checkpoint).vocab_size, **overrides), where)
    Tokenizer.load(tiny_checkpoint).save(where)
    return where


def test_what_gguf_cannot_express_is_one_line(tiny_checkpoint, tmp_path, capsys):
    from dscoder.quant.checkpoint import quantize_checkpoint

    quantize_checkpoint(tiny_checkpoint, tmp_path / "int8", bits=8)
    no_tokenizer = tmp_path / "no_tok"
    dscoder.save_model(dscoder.load_model(tiny_checkpoint), no_tokenizer)
    (tmp_path / "folder.gguf").mkdir()
    (tmp_path / "notes.gguf").write_text("mine")
    cases = [
        (tiny_checkpoint, "a.gguf", ["--type", "q4_0"], ["unknown GGUF tensor type 'q4_0'"]),
        (tmp_path / "int8", "a.gguf", [], ["a quantized checkpoint"]),
        (_variant(tiny_checkpoint, tmp_path / "linear", rope_scaling={"type": "linear", "factor": 2.0}), "a.gguf",
         [], ["rope_scaling type 'linear'", "GGUF cannot express"]),
        (_variant(tiny_checkpoint, tmp_path / "groups", topk_method="group_limited_greedy", n_group=4, topk_group=2),
         "a.gguf", [], ["group-limited routing", "GGUF cannot express"]),
        (_variant(tiny_checkpoint, tmp_path / "mscale", rope_scaling={
            "type": "yarn", "factor": 4, "original_max_position_embeddings": 256, "mscale": 1.0,
            "mscale_all_dim": 0.707}), "a.gguf", [], ["mscale", "GGUF cannot express"]),
        (tmp_path / "missing", "a.gguf", [], ["no such checkpoint or run"]),
        (no_tokenizer, "a.gguf", [], ["no tokenizer"]),
        (tiny_checkpoint, "folder.gguf", [], ["is a directory"]),
        (tiny_checkpoint, "notes.gguf", [], ["not a GGUF file"]),
        (tiny_checkpoint, "model.bin", [], ["must end in .gguf"]),
        (tiny_checkpoint, "a.gguf", ["--dtype", "bfloat16"], ["--dtype is for --format hf"]),
    ]
    for source, out, extra, needles in cases:
        assert main(["export", str(source), "--out", str(tmp_path / out), "--format", "gguf", *extra]) == 2, source
        assert_one_line_error(capsys.readouterr().err, *needles)
    assert not (tmp_path / "a.gguf").exists() and (tmp_path / "notes.gguf").read_text() == "mine"
    assert main(["export", str(tiny_checkpoint), "--out", str(tmp_path / "hf"), "--type", "f16"]) == 2
    assert_one_line_error(capsys.readouterr().err, "--type is for --format gguf")


def test_pre_tokenizer_names():
    def pre(*patterns):
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            *({"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated"} for p in patterns),
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}}

    assert pre_tokenizer_name(pre(*DEEPSEEK_SPLITS), "t") == "deepseek-v3"
    llm = ("[\r\n]", "\\s?[A-Za-zµÀ-ÖØ-öø-ƺ]+", "\\s?[!-/:-~！-／：-～‘-‟　-。]+", "\\s+$", "[一-龥ࠀ-一가-퟿]+", "\\p{N}+")
    assert pre_tokenizer_name(pre(*llm), "t") == "deepseek-llm"  # DeepSeek-V2's tokenizer family
    assert pre_tokenizer_name(pre("[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", "[一-龥ࠀ-一가-퟿]+", "\\p{N}"),
                              "t") == "deepseek-coder"
    with pytest.raises(DscoderError, match="none of llama.cpp's DeepSeek ones"):
        pre_tokenizer_name(pre("\\p{N}{1,3}"), "t")
    with pytest.raises(DscoderError, match="none of llama.cpp's DeepSeek ones"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel"}}, "t")


def test_split_kv_b_is_per_head():
    H, dn, dv, r = 3, 4, 5, 6
    kv_b = torch.randn(H * (dn + dv), r)
    k_b, v_b = split_kv_b(kv_b, H, dn)
    assert k_b.shape == (H, r, dn) and v_b.shape == (H, dv, r)
    for h in range(H):
        rows = kv_b[h * (dn + dv):(h + 1) * (dn + dv)]
        assert torch.equal(k_b[h], rows[:dn].T) and torch.equal(v_b[h], rows[dn:])


DEEPSEEK = os.environ.get("DSCODER_DEEPSEEK_TOKENIZER")


@pytest.mark.skipif(not DEEPSEEK or not Path(DEEPSEEK, "tokenizer.json").is_file(),
                    reason="DSCODER_DEEPSEEK_TOKENIZER does not name a folder with DeepSeek's tokenizer.json")
def test_deepseek_v3_tokenizer_embeds_as_llama_cpp_names_it(tmp_path, capsys):
    """DeepSeek's own tokenizer file (DeepSeek-V3's, 128,815 tokens, in an embedding of 129,280 as V3 has)."""
    tok = Tokenizer.load(DEEPSEEK)
    where = tmp_path / "v3tok"
    dscoder.save_model(tiny_model(vocab_size=129280), where)
    tok.save(where)
    reader = gguf.GGUFReader(_export(capsys, where, tmp_path / "v3.gguf"))
    assert _field(reader, "tokenizer.ggml.pre") == "deepseek-v3"
    tokens, types = _field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == 129280 and tokens[:tok.vocab_size] == [tok.id_to_token(i) for i in range(tok.vocab_size)]
    assert types[tok.bos_id] == types[tok.fim_hole_id] == gguf.TokenType.CONTROL and types[-1] == gguf.TokenType.UNUSED
    data = json.loads(Path(DEEPSEEK, "tokenizer.json").read_text())
    assert len(_field(reader, "tokenizer.ggml.merges")) == len(data["model"]["merges"])
    assert (_field(reader, "tokenizer.ggml.fim_pre_token_id"), _field(reader, "tokenizer.ggml.fim_suf_token_id"),
            _field(reader, "tokenizer.ggml.fim_mid_token_id")) == (tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id)
    assert (_field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id")) == (0, 1)
