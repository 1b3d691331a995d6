"""``dscoder export --format gguf``: an HF checkpoint or a training run → one GGUF file for llama.cpp / Ollama.

The file follows llama.cpp's ``deepseek2`` architecture in its MLA layout (the one llama.cpp's own converter,
``convert_hf_to_gguf.py``, writes since 2025):

* ``kv_b_proj`` ``[H*(dn+dv), r]`` is stored split per head: ``attn_k_b`` ``[H, r, dn]`` (each head's key block
  transposed) and ``attn_v_b`` ``[H, dv, r]``, so llama.cpp can absorb them and cache only the latent; the
  attention is described as one KV head with key length ``r + dr`` and value length ``r`` (the ``*_mla`` lengths
  are the per-head ``dn + dr`` and ``dv``).
* routed experts are stacked per layer (``ffn_{gate,up,down}_exps`` ``[E, out, in]``), shared experts are
  ``ffn_*_shexp``, the first ``first_k_dense_replace`` layers have a dense ``ffn_gate/up/down``.
* the tokenizer is embedded as GPT-2 style BPE (``tokenizer.ggml.model`` "gpt2"): tokens, types, merges, bos/eos/pad
  ids, the FIM prefix/suffix/middle ids (``<｜fim▁begin｜>``, ``<｜fim▁hole｜>``, ``<｜fim▁end｜>``) and the chat
  template; ``tokenizer.ggml.pre`` names llama.cpp's pre-tokenizer that equals the file's (``deepseek-v3`` for a
  tokenizer trained by dscoder, ``deepseek-llm`` for DeepSeek-V2's).

Tensor types: f16 or bf16 (norms and the router stay f32, as llama.cpp's converter keeps them), or q8_0 (blocks of
32 along a row with one f16 scale; a tensor whose rows are not a multiple of 32 falls back to f16, as in
llama.cpp's converter). Tensors are read one at a time from the memory-mapped safetensors and written straight to
the file, so memory stays at about one layer's stacked experts. The tensor table is written first (names, shapes,
types), then the data in the same order; the file appears only when complete.

What GGUF's ``deepseek2`` cannot express is refused with one line rather than written as a file that llama.cpp
would run differently: a quantized dscoder checkpoint (dequantizing int4 to q8_0 would pretend to precision it
lacks), linear RoPE scaling, YaRN whose ``mscale`` differs from ``mscale_all_dim``, group-limited routing with
more than one group (llama.cpp scores a group by its two best experts, DeepSeek-V2 by its best one) and MoE layers
that are not every layer after the dense ones.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dscoder.config import ModelConfig, yarn_mscale
from dscoder.errors import CheckpointError, DscoderError

GGUF_TYPES = ("f16", "bf16", "q8_0")
ARCH = "deepseek2"
GGUF_MAGIC = b"GGUF"
_CHUNK_ELEMENTS = 1 << 22  # rows converted at once: 16 MB in fp32


def _gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover - a dependency; only a broken install lacks it
        raise DscoderError("the 'gguf' package is not installed (pip install gguf); it writes GGUF files") from None
    return gguf


# --------------------------------------------------------------------------------------------- the source tensors
class _Source:
    """HF-named tensors, read lazily: from safetensors files (memory-mapped) or from an in-memory state dict."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], read: Callable[[str, int, int], torch.Tensor], where: str):
        self.shapes, self._read, self.where = shapes, read, where
        self.asked: set[str] = set()  # every key the plan looked up: the rest has no place in the file

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def shape(self, key: str) -> tuple[int, ...]:
        self.asked.add(key)
        if key not in self.shapes:
            raise CheckpointError(f"{self.where}: missing tensor '{key}'")
        return self.shapes[key]

    def get(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of ``key`` (all of it by default); only those rows are read from the file."""
        shape = self.shape(key)
        return self._read(key, start, shape[0] if stop is None else stop)

    def row_chunks(self, key: str, leading: bool = False) -> Iterator[torch.Tensor]:
        """``key`` in pieces of rows small enough to convert one at a time (each ``[1, ...]`` when ``leading``:
        one expert of a stacked tensor)."""
        shape = self.shape(key)
        if len(shape) == 1:
            yield self.get(key)
            return
        step = 1 if leading else max(1, _CHUNK_ELEMENTS // math.prod(shape[1:]))
        for start in range(0, shape[0], step):
            yield self.get(key, start, min(start + step, shape[0]))


def _safetensors_source(directory: Path, stack: ExitStack) -> _Source:
    from safetensors import SafetensorError

    from dscoder.model.checkpoint import _open, _weight_files

    files = _weight_files(directory)
    handles = {p: stack.enter_context(_open(p)) for p in sorted(set(files.values()))}
    shapes = {k: tuple(handles[f].get_slice(k).get_shape()) for k, f in files.items()}

    def read(key: str, start: int, stop: int) -> torch.Tensor:
        try:
            return handles[files[key]].get_slice(key)[start:stop]
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{files[key]}: cannot read tensor '{key}' ({e})") from None

    return _Source(shapes, read, str(directory))


def _state_dict_source(tensors: dict[str, torch.Tensor], where: str) -> _Source:
    return _Source({k: tuple(t.shape) for k, t in tensors.items()}, lambda k, a, b: tensors[k][a:b], where)


# --------------------------------------------------------------------------------------------- the tensor plan
@dataclass
class _Planned:
    name: str                                  # GGUF name, e.g. blk.3.ffn_up_exps.weight
    shape: tuple[int, ...]                     # torch order (outermost first); GGUF stores it reversed
    keep_f32: bool                             # norms and the router
    pieces: Callable[[], Iterator[torch.Tensor]]  # the values in pieces along dim 0, read while writing


def _tensor_names():
    gguf = _gguf()
    T = gguf.MODEL_TENSOR
    allowed = set(gguf.MODEL_TENSORS[gguf.MODEL_ARCH.DEEPSEEK2])

    def name(kind, bid: int | None = None, suffix: str = "weight") -> str:
        assert kind in allowed, kind  # every tensor written is one llama.cpp's deepseek2 loads
        return gguf.TENSOR_NAMES[kind].format(bid=bid) + "." + suffix

    return T, name


def plan_tensors(config: ModelConfig, src: _Source) -> list[_Planned]:
    """Every GGUF tensor of ``config``'s model, in writing order, each with how to read it from ``src``."""
    T, name = _tensor_names()
    plan: list[_Planned] = []

    def direct(kind, key: str, bid: int | None = None) -> None:
        shape = src.shape(key)
        plan.append(_Planned(name(kind, bid), shape, len(shape) == 1 or kind == T.FFN_GATE_INP,
                             lambda: src.row_chunks(key)))

    direct(T.TOKEN_EMBD, "model.embed_tokens.weight")
    H, dn, dv, r = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim, config.kv_lora_rank
    E, inter = config.n_routed_experts, config.moe_intermediate_size
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        direct(T.ATTN_NORM, p + "input_layernorm.weight", i)
        if config.q_lora_rank is None:
            direct(T.ATTN_Q, p + "self_attn.q_proj.weight", i)
        else:
            direct(T.ATTN_Q_A, p + "self_attn.q_a_proj.weight", i)
            direct(T.ATTN_Q_A_NORM, p + "self_attn.q_a_layernorm.weight", i)
            direct(T.ATTN_Q_B, p + "self_attn.q_b_proj.weight", i)
        direct(T.ATTN_KV_A_MQA, p + "self_attn.kv_a_proj_with_mqa.weight", i)
        direct(T.ATTN_KV_A_NORM, p + "self_attn.kv_a_layernorm.weight", i)
        kv_b = p + "self_attn.kv_b_proj.weight"
        if src.shape(kv_b) != (H * (dn + dv), r):
            raise CheckpointError(f"{src.where}: tensor '{kv_b}' has shape {list(src.shape(kv_b))}; expected "
                                  f"{[H * (dn + dv), r]}")
        plan.append(_Planned(name(T.ATTN_K_B, i), (H, r, dn), False,
                             lambda k=kv_b: iter([split_kv_b(src.get(k), H, dn)[0]])))
        plan.append(_Planned(name(T.ATTN_V_B, i), (H, dv, r), False,
                             lambda k=kv_b: iter([split_kv_b(src.get(k), H, dn)[1]])))
        direct(T.ATTN_OUT, p + "self_attn.o_proj.weight", i)
        direct(T.FFN_NORM, p + "post_attention_layernorm.weight", i)
        if not config.is_moe_layer(i):
            for kind, proj in ((T.FFN_GATE, "gate_proj"), (T.FFN_UP, "up_proj"), (T.FFN_DOWN, "down_proj")):
                direct(kind, f"{p}mlp.{proj}.weight", i)
            continue
        direct(T.FFN_GATE_INP, p + "mlp.gate.weight", i)
        experts = p + "mlp.experts"
        for kind, proj in ((T.FFN_GATE_EXP, "gate_proj"), (T.FFN_UP_EXP, "up_proj"), (T.FFN_DOWN_EXP, "down_proj")):
            shape = _expert_shape(src, experts, proj, E, inter)
            plan.append(_Planned(name(kind, i), shape, False,
                                 lambda x=experts, w=proj: _stacked_experts(src, x, w, E, inter)))
        if config.n_shared_experts:
            for kind, proj in ((T.FFN_GATE_SHEXP, "gate_proj"), (T.FFN_UP_SHEXP, "up_proj"),
                               (T.FFN_DOWN_SHEXP, "down_proj")):
                direct(kind, f"{p}mlp.shared_experts.{proj}.weight", i)
    direct(T.OUTPUT_NORM, "model.norm.weight")
    if not config.tie_word_embeddings:  # tied: llama.cpp reuses token_embd for the output
        direct(T.OUTPUT, "lm_head.weight")
    return plan


def split_kv_b(kv_b: torch.Tensor, heads: int, nope_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``kv_b_proj`` ``[H*(dn+dv), r]`` → (``attn_k_b`` ``[H, r, dn]``, ``attn_v_b`` ``[H, dv, r]``): per head the
    first ``dn`` rows are the key's no-RoPE part (stored transposed), the rest the value."""
    per_head = kv_b.reshape(heads, -1, kv_b.shape[-1])
    k_b, v_b = per_head[:, :nope_dim], per_head[:, nope_dim:]
    return k_b.transpose(1, 2).contiguous(), v_b.contiguous()


def _expert_shape(src: _Source, prefix: str, proj: str, E: int, inter: int) -> tuple[int, ...]:
    if f"{prefix}.0.{proj}.weight" in src:
        shapes = {src.shape(f"{prefix}.{e}.{proj}.weight") for e in range(E)}
        if len(shapes) != 1:
            raise CheckpointError(f"{src.where}: the experts of {prefix} differ in {proj} shape")
        return (E, *shapes.pop())
    if proj == "down_proj":
        return src.shape(f"{prefix}.down_proj")
    e, _, d = src.shape(f"{prefix}.gate_up_proj")  # transformers 5 / dscoder layout: gate rows, then up rows
    return (e, inter, d)


def _stacked_experts(src: _Source, prefix: str, proj: str, E: int, inter: int) -> Iterator[torch.Tensor]:
    """``[E, out, in]`` one expert (``[1, out, in]``) at a time, from the hub's per-expert keys or from a stacked
    ``gate_up_proj``/``down_proj``."""
    if f"{prefix}.0.{proj}.weight" in src:
        for e in range(E):
            yield src.get(f"{prefix}.{e}.{proj}.weight").unsqueeze(0)
    elif proj == "down_proj":
        yield from src.row_chunks(f"{prefix}.down_proj", leading=True)
    else:
        for gate_up in src.row_chunks(f"{prefix}.gate_up_proj", leading=True):
            yield gate_up[:, :inter] if proj == "gate_proj" else gate_up[:, inter:]


# --------------------------------------------------------------------------------------------- what GGUF can say
def check_expressible(config: ModelConfig, where: str) -> None:
    """One line for a model llama.cpp's ``deepseek2`` would run differently."""
    rs = config.rope_scaling
    if rs is not None and rs["type"] != "yarn":
        raise DscoderError(f"{where}: rope_scaling type {rs['type']!r}: llama.cpp's deepseek2 implements only YaRN "
                           f"scaling; GGUF cannot express this model")
    if rs is not None:
        factor = float(rs["factor"])
        if not math.isclose(yarn_mscale(factor, rs.get("mscale", 1.0)),
                            yarn_mscale(factor, rs.get("mscale_all_dim", 0.0)), rel_tol=1e-6):
            raise DscoderError(f"{where}: YaRN mscale {rs.get('mscale', 1.0)} differs from mscale_all_dim "
                               f"{rs.get('mscale_all_dim', 0.0)}: llama.cpp's deepseek2 assumes they are equal; GGUF "
                               f"cannot express this model")
    if config.is_moe:
        if config.topk_method == "group_limited_greedy" and config.topk_group < config.n_group:
            raise DscoderError(f"{where}: group-limited routing (n_group {config.n_group}, topk_group "
                               f"{config.topk_group}): llama.cpp's deepseek2 ranks a group by its two best experts, "
                               f"DeepSeek-V2 by its best one; GGUF cannot express this model")
        if config.moe_layer_freq != 1:
            raise DscoderError(f"{where}: moe_layer_freq {config.moe_layer_freq}: llama.cpp's deepseek2 makes every "
                               f"layer after the leading dense ones MoE; GGUF cannot express this model")


def _write_metadata(writer, config: ModelConfig, name: str, file_type: int) -> None:
    gguf = _gguf()
    writer.add_name(name)
    writer.add_file_type(file_type)
    if file_type == gguf.LlamaFileType.MOSTLY_Q8_0:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(1)  # MLA runs as MQA over the latent
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_leading_dense_block_count(config.first_k_dense_replace if config.is_moe else config.num_hidden_layers)
    # 0 when the query has no low-rank step: llama.cpp reads this key for every deepseek2 model whose layer count is
    # not one of the Lite checkpoints' (26 or 27), and a missing key refuses the file; it takes 0 as "attn_q".
    writer.add_q_lora_rank(config.q_lora_rank or 0)
    writer.add_kv_lora_rank(config.kv_lora_rank)
    writer.add_key_length(config.kv_lora_rank + config.qk_rope_head_dim)
    writer.add_value_length(config.kv_lora_rank)
    writer.add_key_length_mla(config.qk_head_dim)
    writer.add_value_length_mla(config.v_head_dim)
    writer.add_rope_dimension_count(config.qk_rope_head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    rs = config.yarn
    if rs is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rs["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rs["original_max_position_embeddings"]))
        writer.add_rope_scaling_yarn_beta_fast(float(rs.get("beta_fast") or 32))
        writer.add_rope_scaling_yarn_beta_slow(float(rs.get("beta_slow") or 1))
        # llama.cpp's deepseek2 reads 0.1 * mscale_all_dim here (its softmax scale is mscale(factor, that)^2)
        writer.add_rope_scaling_yarn_log_mul(0.1 * float(rs.get("mscale_all_dim") or 0.0))
    if config.is_moe:
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
        writer.add_expert_count(config.n_routed_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_shared_count(config.n_shared_experts or 0)
        # the hub's rule is normalize OR scale; llama.cpp normalizes when told, then scales
        normalize = config.norm_topk_prob and config.num_experts_per_tok > 1
        writer.add_expert_weights_norm(normalize)
        writer.add_expert_weights_scale(1.0 if normalize else float(config.routed_scaling_factor))
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
        writer.add_expert_group_count(1)  # groups that change nothing (topk_group == n_group) are left out
        writer.add_expert_group_used_count(1)
    else:
        writer.add_expert_feed_forward_length(config.intermediate_size)
        writer.add_expert_shared_count(0)


# --------------------------------------------------------------------------------------------- the tokenizer
# llama.cpp's BPE pre-tokenizers for the DeepSeek family (llama-vocab.cpp), by their Split regexes
_DEEPSEEK_LLM_SHORT = ("[\r\n]", None, "\\s?[!-/:-~！-／：-～‘-‟　-。]+", "\\s+$", "[一-龥ࠀ-一가-퟿]+", "\\p{N}+")
_DEEPSEEK_CODER = ("[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", "[一-龥ࠀ-一가-퟿]+", "\\p{N}")


def pre_tokenizer_name(tokenizer_json: dict, where: str) -> str:
    """The ``tokenizer.ggml.pre`` whose regexes are the file's: llama.cpp must split text the same way."""
    from dscoder.tokenizer import DEEPSEEK_SPLITS

    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    splits = tuple(s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split")
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if len(splits) + len(byte_level) == len(steps) and len(byte_level) == 1 and splits:
        if splits == tuple(DEEPSEEK_SPLITS):
            return "deepseek-v3"
        if (len(splits) == len(_DEEPSEEK_LLM_SHORT) and splits[1].startswith("\\s?[A-Za-z")
                and all(a == b for a, b in zip(splits, _DEEPSEEK_LLM_SHORT) if b is not None)):
            return "deepseek-llm"
        if splits == _DEEPSEEK_CODER:
            return "deepseek-coder"
    raise DscoderError(f"{where}: the tokenizer's pre-tokenizer is none of llama.cpp's DeepSeek ones (deepseek-llm, "
                       f"deepseek-coder, deepseek-v3); GGUF cannot express it")


def _merges(tokenizer_json: dict, where: str) -> list[str]:
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        raise DscoderError(f"{where}: the tokenizer is {model.get('type')!r}, not byte-level BPE; GGUF's gpt2 "
                           f"tokenizer cannot express it")
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _looks_special(text: str) -> bool:
    """llama.cpp's converter's rule: ``<｜...｜>`` and ``<|...|>`` added tokens are control tokens even when the file
    does not mark them special (DeepSeek's FIM tokens)."""
    return any(text.startswith(a) and text.endswith(b) for a, b in (("<｜", "｜>"), ("<|", "|>")))


def _write_tokenizer(writer, tok, vocab_size: int, where: str) -> None:
    gguf = _gguf()
    data = json.loads(tok.backend.to_str())
    n = tok.vocab_size
    if n > vocab_size:
        raise DscoderError(f"{where}: the tokenizer has {n} tokens but the model only {vocab_size} embeddings")
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        text = tok.id_to_token(i) if i < n else None
        if text is None:  # embeddings past the tokenizer (a padded vocabulary)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].get("special") or _looks_special(text)
                         else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(data, where))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(data, where))
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    writer.add_pad_token_id(tok.pad_id)
    writer.add_add_bos_token(tok.add_bos_token)
    writer.add_add_eos_token(False)
    if tok.has_fim:  # DeepSeek's PSM prompt: begin PREFIX hole SUFFIX end -> llama.cpp's pre / suf / mid
        writer.add_uint32(gguf.Keys.Tokenizer.FIM_PRE_ID, tok.fim_begin_id)
        writer.add_uint32(gguf.Keys.Tokenizer.FIM_SUF_ID, tok.fim_hole_id)
        writer.add_uint32(gguf.Keys.Tokenizer.FIM_MID_ID, tok.fim_end_id)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


# --------------------------------------------------------------------------------------------- tensor data
def tensor_qtype(planned: _Planned, kind: str):
    """The GGML type ``planned`` is stored as under ``--type kind``."""
    Q = _gguf().GGMLQuantizationType
    if planned.keep_f32:
        return Q.F32
    if kind == "q8_0":
        return Q.Q8_0 if planned.shape[-1] % 32 == 0 else Q.F16  # llama.cpp's converter falls back to f16 alike
    return Q.BF16 if kind == "bf16" else Q.F16


def _encode(values: torch.Tensor, qtype, name: str, where: str) -> np.ndarray:
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    if qtype == Q.BF16:
        return values.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    x = values.to(torch.float32).contiguous().numpy()
    if qtype == Q.F32:
        return x
    if qtype == Q.F16:
        out = x.astype(np.float16)
        if not np.isfinite(out).all() and np.isfinite(x).all():
            raise DscoderError(f"{where}: tensor {name} holds values beyond f16's range (65504); use --type bf16")
        return out
    return gguf.quants.quantize(x, qtype)


def _assemble(p: _Planned, qtype, where: str) -> np.ndarray:
    """``p``'s encoded data, converted piece by piece into one preallocated array (the tensor in its GGUF type,
    plus one piece at a time in fp32)."""
    out, row = None, 0
    for piece in p.pieces():
        encoded = _encode(piece, qtype, p.name, where)
        if out is None:
            if encoded.ndim == 1 or piece.shape[0] == p.shape[0]:
                out = encoded
                row = p.shape[0] if encoded.ndim > 1 else len(encoded)
                continue
            out = np.empty((p.shape[0], *encoded.shape[1:]), dtype=encoded.dtype)
        out[row:row + len(encoded)] = encoded
        row += len(encoded)
    if out is None or row != p.shape[0] or tuple(out.shape[1:-1]) != p.shape[1:-1]:
        raise CheckpointError(f"{where}: {p.name} does not have the shape {list(p.shape)} its config gives")
    return out


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    from gguf.quants import quant_shape_to_byte_shape

    return int(np.prod(quant_shape_to_byte_shape(shape, qtype)))


# --------------------------------------------------------------------------------------------- the export
def _check_out(out: Path) -> None:
    if out.is_dir():
        raise DscoderError(f"{out}: --out is a directory; give a file name ending in .gguf")
    if out.suffix != ".gguf":
        raise DscoderError(f"{out}: --out must end in .gguf")
    if out.exists():
        with open(out, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise DscoderError(f"{out}: exists and is not a GGUF file; give a new name or an earlier export")


def is_hf_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and any(
        (path / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json"))


def export_gguf(source: str | Path, out: str | Path, type: str = "f16", merge_lora: bool = False) -> Path:
    """Write ``out`` (a ``.gguf`` file) from an HF checkpoint directory, a run directory or a checkpoint."""
    gguf = _gguf()
    from dscoder.tokenizer import Tokenizer

    if type not in GGUF_TYPES:
        raise DscoderError(f"unknown GGUF tensor type {type!r} (expected one of {', '.join(GGUF_TYPES)})")
    source, out = Path(source), Path(out)
    if not source.exists():
        raise DscoderError(f"{source}: no such checkpoint or run directory")
    _check_out(out)
    with ExitStack() as stack:
        if is_hf_checkpoint(source):
            from dscoder.quant.checkpoint import quantization_config

            if quantization_config(source) is not None:
                raise DscoderError(f"{source}: a quantized checkpoint (its config.json has quantization_config); "
                                   f"export GGUF from the float checkpoint it was made from")
            if merge_lora:
                raise DscoderError(f"{source}: --merge-lora applies to a LoRA training run, not an HF checkpoint")
            config = ModelConfig.from_json_file(source / "config.json")
            check_expressible(config, str(source))
            src = _safetensors_source(source, stack)
            tok_dir = source if (source / "tokenizer.json").is_file() else None
        else:
            from dscoder.model.checkpoint import hub_state_dict
            from dscoder.train.export import load_run_model

            model, tok_dir, where = load_run_model(source, merge_lora)
            config = model.config
            check_expressible(config, where)
            src = _state_dict_source(hub_state_dict(model), where)
        if tok_dir is None:
            raise DscoderError(f"{source}: no tokenizer (tokenizer.json) to embed; a GGUF file needs one")
        tok = Tokenizer.load(tok_dir)
        plan = plan_tensors(config, src)
        unused = sorted(k for k in set(src.shapes) - src.asked if not k.endswith("inv_freq"))
        if unused:
            raise DscoderError(f"{src.where}: tensor '{unused[0]}' has no place in llama.cpp's deepseek2"
                               + (f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""))
        file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[type]
        from dscoder.io import atomic_path

        with atomic_path(out) as tmp:
            writer = gguf.GGUFWriter(tmp, ARCH)
            stack.callback(writer.close)  # also when a tensor turns out unreadable half-way
            _write_metadata(writer, config, source.resolve().name, file_type)
            _write_tokenizer(writer, tok, config.vocab_size, str(tok_dir))
            qtypes = [tensor_qtype(p, type) for p in plan]
            for p, q in zip(plan, qtypes):
                writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), _nbytes(p.shape, q), raw_dtype=q)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for p, q in zip(plan, qtypes):
                writer.write_tensor_data(_assemble(p, q, src.where))
            writer.close()
    return out
