"""dscoder's GGUF export run in llama.cpp: greedy tokens and logits beside dscoder's own, on the same prompts.

A small random DeepSeek-V2 (the ``tiny`` preset: MLA, YaRN, a dense first layer then routed and shared experts;
weights ~ N(0, 1/fan_in) so that logits are O(1) and greedy choices are not ties) with a byte-level BPE trained on
a few of the Python standard library's files is saved as an HF checkpoint, exported with
``dscoder export --format gguf --type TYPE`` and loaded by llama.cpp through llama-cpp-python. For each prompt
(code from the standard library, token ids from dscoder's tokenizer, so both sides see the same ids) it prints the
two greedy continuations, how many leading tokens agree, and the cosine between the two next-token logit vectors
at the end of the prompt; and whether llama.cpp's own tokenizer (read from the GGUF) encodes the prompt's text to
the same ids as dscoder's.

dscoder runs the float32 model with the weights the file holds (each matrix rounded to f16, or to q8_0 blocks where
the export writes q8_0), llama.cpp its own CPU kernels (for q8_0 those also round the activations to 8 bits, which
dscoder does not); a small numeric difference can flip a greedy choice between two close logits and the
continuations part from there, so the first tokens and the logit cosine are the figures that matter.

Needs llama-cpp-python (not a dscoder dependency; it builds llama.cpp from source):

    pip install llama-cpp-python
    python benchmarks/bench_gguf_llamacpp.py [--type f16|q8_0] [--new 16] [--prompts 4]

Without llama-cpp-python it says so in one line and exits 0. Not run in CI.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F


def stdlib_texts(n_files: int = 40) -> list[str]:
    """The first ``n_files`` of the standard library's top-level modules (sorted by name): a fixed code corpus."""
    files = sorted(Path(os.__file__).parent.glob("*.py"))[:n_files]
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


@torch.no_grad()
def build_checkpoint(directory: Path, vocab: int) -> Path:
    import dscoder
    from dscoder.tokenizer import Tokenizer

    texts = stdlib_texts()
    tok = Tokenizer.train(texts, vocab_size=vocab)
    config = dscoder.ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size)
    model = dscoder.build_model(config, seed=0)
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if p.dim() > 1:
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    dscoder.save_model(model.eval(), directory, dtype="float32")
    tok.save(directory)
    return directory


def _as_stored(w: torch.Tensor, kind: str) -> torch.Tensor:
    """``w [..., in]`` rounded as the export stores it: q8_0 in blocks of 32 inputs where ``in`` allows, else f16."""
    if kind == "q8_0" and w.shape[-1] % 32 == 0:
        import gguf

        q = gguf.quants.quantize(w.detach().float().numpy(), gguf.GGMLQuantizationType.Q8_0)
        return torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(w.shape).copy())
    return w.half().float()


@torch.no_grad()
def round_like_gguf(model, kind: str) -> None:
    """Give the float32 model the weights llama.cpp reads from the file: every matrix but the router (kept f32)
    through f16 or q8_0, ``kv_b_proj`` per head as the export splits it (``attn_k_b`` transposed, rows of
    qk_nope inputs; ``attn_v_b`` rows of kv_lora inputs)."""
    c = model.config
    for name, p in model.named_parameters():
        if p.dim() < 2 or name.endswith("mlp.gate.weight"):
            continue
        if name.endswith("kv_b_proj.weight"):
            w = p.view(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
            k, v = w[:, :c.qk_nope_head_dim], w[:, c.qk_nope_head_dim:]
            k.copy_(_as_stored(k.transpose(1, 2).contiguous(), kind).transpose(1, 2))
            v.copy_(_as_stored(v.contiguous(), kind))
        else:
            p.copy_(_as_stored(p, kind))


def greedy_dscoder(model, prompt: list[int], new: int) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation (the whole sequence re-run each step: a reference, not fast) and the logits after the
    prompt."""
    ids = list(prompt)
    first = None
    with torch.no_grad():
        for _ in range(new):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            first = logits if first is None else first
            ids.append(int(logits.argmax()))
    return ids[len(prompt):], first


def greedy_llamacpp(llm, prompt: list[int], new: int) -> tuple[list[int], torch.Tensor]:
    llm.reset()
    llm.eval(prompt)
    first = torch.from_numpy(llm.scores[llm.n_tokens - 1].copy())
    out = []
    for _ in range(new):
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
        out.append(tok)
        llm.eval([tok])
    return out, first


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--type", choices=["f16", "q8_0"], default="f16", help="GGUF tensor type (default f16)")
    ap.add_argument("--new", type=int, default=16, help="greedy tokens per prompt")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=1024)
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError as e:
        print(f"llama-cpp-python is not importable ({e}; pip install llama-cpp-python); nothing to compare")
        return 0

    import dscoder
    from dscoder.gguf_export import export_gguf
    from dscoder.tokenizer import Tokenizer

    tmp = Path(tempfile.mkdtemp())
    ckpt = build_checkpoint(tmp / "hf", args.vocab)
    gguf_path = export_gguf(ckpt, tmp / "model.gguf", type=args.type)
    tok = Tokenizer.load(ckpt)
    model = dscoder.load_model(ckpt).float().eval()
    round_like_gguf(model, args.type)  # the weights llama.cpp reads
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=256, n_batch=256, n_threads=torch.get_num_threads(),
                          logits_all=True, verbose=False)
    print(f"llama-cpp-python {llama_cpp.__version__}; GGUF {args.type}, {gguf_path.stat().st_size / 1e6:.2f} MB; "
          f"model: tiny preset, vocabulary {tok.vocab_size}")

    texts = stdlib_texts(60)[40:40 + args.prompts]  # files the tokenizer was not trained on
    same_tokens = total_tokens = lead_sum = 0
    cosines, tokenizer_agree = [], 0
    for i, text in enumerate(texts):
        snippet = text[:400]
        ours_full = tok.encode(snippet, add_bos=True)
        ids = ours_full[: args.prompt_tokens]
        theirs_ids = llm.tokenize(snippet.encode(), add_bos=True, special=False)
        tokenizer_agree += theirs_ids == ours_full
        ours, ours_logits = greedy_dscoder(model, ids, args.new)
        theirs, their_logits = greedy_llamacpp(llm, ids, args.new)
        lead = next((j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
        cos = F.cosine_similarity(ours_logits, their_logits.float(), dim=0).item()
        cosines.append(cos)
        same_tokens += sum(a == b for a, b in zip(ours, theirs))
        total_tokens += len(ours)
        lead_sum += lead
        agree = "agree" if theirs_ids == ours_full else "DIFFER"
        print(f"\nprompt {i + 1} ({len(ids)} tokens): logits cosine {cos:.6f}; first {lead} of {len(ours)} greedy "
              f"tokens agree; tokenizers {agree} on the {len(snippet)}-character text")
        print(f"  dscoder   {ours}")
        print(f"  llama.cpp {theirs}")
    print(f"\nsummary: greedy tokens equal at {same_tokens} of {total_tokens} positions, leading agreement "
          f"{lead_sum} of {total_tokens}; logits cosine min {min(cosines):.6f}; tokenizers agree on "
          f"{tokenizer_agree} of {len(texts)} texts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
