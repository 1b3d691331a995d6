"""SFT: the loss mask is exactly the assistant replies, packing keeps documents apart, the loss falls, resume/export."""

from __future__ import annotations

import pytest
import torch

import dscoder
from conftest import align_recipe, jsonl_rows, write_lines
from dscoder.errors import DscoderError
from dscoder.tokenizer import Tokenizer
from dscoder.align.sft import IGNORE, collate, document_mask, encode_chat, make_example, pack, sft

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle"]


def chats(n: int = 24) -> list[list[dict]]:
    out = []
    for i in range(n):
        a, b = WORDS[i % 8], WORDS[(i * 3 + 1) % 8]
        msgs = [{"role": "user", "content": f"reverse: {a} {b}"}, {"role": "assistant", "content": f"{b} {a}"}]
        if i % 3 == 0:
            msgs = [{"role": "system", "content": "You are terse."}, *msgs,
                    {"role": "user", "content": f"first: {a} {b}"}, {"role": "assistant", "content": a}]
        out.append(msgs)
    return out


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft-tok")
    texts = [f"User: reverse: {a} {b}\n\nAssistant: {b} {a}" for a in WORDS for b in WORDS] * 3
    Tokenizer.train(texts, vocab_size=320).save(root)
    return root


def test_mask_covers_exactly_the_assistant_tokens(tok_dir):
    tok = Tokenizer.load(tok_dir)
    messages = chats(1)[0]
    ids, assistant = encode_chat(tok, messages)
    assert ids == tok.encode(tok.apply_chat_template(messages, add_generation_prompt=False), allow_special=True)
    marked = tok.decode([i for i, a in zip(ids, assistant) if a])
    replies = "".join(" " + m["content"] + tok.eos_token for m in messages if m["role"] == "assistant")
    assert marked == replies
    # the rest decodes to the prompt parts, and each reply starts right after a generation prompt "Assistant:"
    rest = tok.decode([i for i, a in zip(ids, assistant) if not a])
    assert rest == tok.bos_token + "You are terse.\n\nUser: reverse: apple river\n\nAssistant:User: first: apple " \
                                   "river\n\nAssistant:"
    first = assistant.index(True)
    assert tok.decode(ids[:first]).endswith("Assistant:")
    assert ids[:first] == tok.encode(tok.apply_chat_template(messages[:2]), allow_special=True)
    # labels: the next token where it is an assistant token, -100 elsewhere (never across the end)
    ex = make_example(ids, assistant, 10_000)
    assert [lab for lab in ex.labels if lab != IGNORE] == [i for i, a in zip(ids, assistant) if a]
    assert ex.labels[-1] == IGNORE and ex.labels[first - 1] == ids[first]


def test_packing_keeps_documents_apart(tok_dir):
    tok = Tokenizer.load(tok_dir)
    model = dscoder.build_model(dscoder.ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size), seed=0)
    examples = [make_example(*encode_chat(tok, m), 64) for m in chats(4)]
    rows = pack(examples, 128, tok.pad_id)
    assert len(rows) < len(examples) and max(rows[0]["doc"]) >= 1
    batch = collate(rows)
    h, _ = model.hidden(batch["ids"], document_mask(batch["doc"]), batch["pos"])
    r, doc = 0, 1  # the second conversation of the first row equals that conversation alone
    sel = batch["doc"][r] == doc
    alone = model(batch["ids"][r][sel][None]).logits[0]
    torch.testing.assert_close(model.lm_head(h[r][sel]), alone, atol=1e-5, rtol=1e-5)
    m = document_mask(batch["doc"])[0, 0]
    first_len = int((batch["doc"][0] == 0).sum())
    assert not m[first_len:, :first_len].any() and m[first_len, first_len]
    with pytest.raises(ValueError, match="4-D attention_mask must be bool"):
        model.hidden(batch["ids"], document_mask(batch["doc"])[:, :, 1:])


def recipe(tok_dir, data, *overrides):
    return align_recipe("sft", f"model.tokenizer={tok_dir}", f"data.path={data}", f"data.eval_path={data}", *overrides)


def test_sft_drives_assistant_loss_down_resumes_and_exports(tok_dir, tmp_path):
    data = write_lines(tmp_path / "chat.jsonl", [{"messages": m} for m in chats()])
    cfg = recipe(tok_dir, data, "train.steps=40", "train.ckpt_every=20")
    assert cfg.train.warmup_steps == 5 and cfg.data.packing
    summary = sft(cfg, tmp_path / "run")
    rows = jsonl_rows(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 40 and rows[1]["lr"] > rows[0]["lr"]
    assert summary["last_loss"] < 0.5 * summary["first_loss"], summary
    assert summary["eval_loss"] < 0.5 * summary["first_loss"]
    exported = dscoder.load_model(summary["export"])
    assert Tokenizer.load(summary["export"]).vocab_size == exported.config.vocab_size
    # resume: stop at 20, continue to 40, the same final loss as the uninterrupted run
    sft(recipe(tok_dir, data, "train.steps=40", "train.ckpt_every=20"), tmp_path / "cut", max_steps=20)
    resumed = sft(recipe(tok_dir, data, "train.steps=40", "train.ckpt_every=20"), tmp_path / "cut", resume=True)
    assert resumed["last_loss"] == pytest.approx(summary["last_loss"], rel=1e-6)
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 40


def test_bad_chat_data_is_one_line(tok_dir, tmp_path):
    bad = write_lines(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DscoderError, match=r"bad.jsonl:1: no assistant message"):
        sft(recipe(tok_dir, bad), tmp_path / "run")
    (tmp_path / "worse.jsonl").write_text('{"messages": [}\n')
    with pytest.raises(DscoderError, match=r"worse.jsonl:1: not valid JSON"):
        sft(recipe(tok_dir, tmp_path / "worse.jsonl"), tmp_path / "run2")
    with pytest.raises(DscoderError, match="unknown config key 'sft.bogus'"):
        recipe(tok_dir, bad, "sft.bogus=1")


def test_run_layer_settings_and_faults(tok_dir, tmp_path):
    """train.dtype is honoured (bf16 autocast), compile and activation checkpointing are refused in one line, a
    length past the context and a non-finite loss stop the run with one line (the shared run layer)."""
    from dscoder.errors import ConfigError

    data = write_lines(tmp_path / "chat.jsonl", [{"messages": m} for m in chats(8)])
    common = ["train.steps=1", "train.export=false", "data.eval_path="]
    f32 = sft(recipe(tok_dir, data, *common, "train.dtype=float32"), tmp_path / "f32")
    bf16 = sft(recipe(tok_dir, data, *common, "train.dtype=bfloat16"), tmp_path / "bf16")
    assert bf16["first_loss"] != f32["first_loss"] and bf16["first_loss"] == pytest.approx(f32["first_loss"], rel=0.02)
    for key in ("compile", "activation_checkpointing"):
        with pytest.raises(ConfigError, match=f"train.{key} = true: not supported by the alignment recipes"):
            recipe(tok_dir, data, f"train.{key}=true")
    with pytest.raises(ConfigError, match="data.seq_len = 4096: longer than the model's context"):
        sft(recipe(tok_dir, data, "data.seq_len=4096"), tmp_path / "long")
    with pytest.raises(DscoderError, match=r"^step 2: .*the run stopped before this optimizer step"):
        sft(recipe(tok_dir, data, "train.steps=4", "train.warmup_steps=0", "train.lr=1e30", "train.ckpt_every=1",
                   *common[1:]), tmp_path / "nan")
    assert [p.name for p in (tmp_path / "nan" / "checkpoints").iterdir()] == ["step-000001"]
