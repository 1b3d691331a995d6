"""Document-level FIM: lossless undo for PSM, SPM and plain documents, the paper's PSM layout, the FIM and SPM rates,
uniform cut points, and determinism for a seed."""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from dscoder.data.fim import document_tokens, fim_split, fim_tokens, undo_fim
from dscoder.errors import DscoderError
from dscoder.tokenizer import EOS_TOKEN, FIM_BEGIN_TOKEN, FIM_END_TOKEN, FIM_HOLE_TOKEN, Tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SENTINEL_STRINGS = [FIM_BEGIN_TOKEN, FIM_HOLE_TOKEN, FIM_END_TOKEN, EOS_TOKEN]
PIECES = list("abcxyz_(){}:=.,#\"'") + [" ", "  ", "\t", "\n", "\r\n", "    ", "é", "ß", "中", "文", "🎉", "👍🏽",
                                        "\u200d", "e\u0301", "\x00", "def ", "return ", "0", "42"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = []
    for path in sorted(STDLIB.glob("*.py"))[:40]:
        source = path.read_text(encoding="utf-8")
        texts += [source[i:i + 2000] for i in range(0, min(len(source), 10000), 2000)]
    return Tokenizer.train(texts, vocab_size=800)


def random_document(rng: np.random.Generator) -> str:
    """Empty, one character, or up to ~300 characters of code-like pieces, arbitrary code points (multi-byte in
    UTF-8, controls) and the sentinels' own spellings."""
    kind = rng.integers(0, 10)
    if kind == 0:
        return ""
    if kind == 1:
        return _random_char(rng)
    parts = []
    for _ in range(rng.integers(1, 120)):
        r = rng.random()
        if r < 0.7:
            parts.append(PIECES[rng.integers(len(PIECES))])
        elif r < 0.97:
            parts.append(_random_char(rng))
        else:
            parts.append(SENTINEL_STRINGS[rng.integers(len(SENTINEL_STRINGS))])
    return "".join(parts)


def _random_char(rng: np.random.Generator) -> str:
    while True:
        c = int(rng.integers(0, 0x110000))
        if not 0xD800 <= c <= 0xDFFF:  # surrogates are not encodable text
            return chr(c)


@pytest.fixture(scope="module")
def documents() -> list[str]:
    rng = np.random.default_rng(1234)
    docs = ["", "x", "é", "🎉", "\n"] + [random_document(rng) for _ in range(400)]
    assert any(len(d) > 100 for d in docs) and sum(d == "" for d in docs) > 5
    return docs


@pytest.mark.parametrize("fim_rate, spm_rate, layout", [
    (1.0, 0.0, "psm"), (1.0, 1.0, "spm"), (0.0, 0.0, "plain"), (0.5, 0.5, "mixed"),
])
def test_undo_fim_recovers_every_document(tok, documents, fim_rate, spm_rate, layout):
    rng = np.random.default_rng(7)
    sentinel_ids = {tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id}
    for text in documents:
        ids = document_tokens(text, rng, tok, fim_rate=fim_rate, spm_rate=spm_rate)
        assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
        if layout == "plain":  # sentinel spellings inside the text never become sentinel ids
            assert not sentinel_ids & set(ids)
        elif layout in ("psm", "spm"):
            assert ids[0] == tok.fim_begin_id and sum(i in sentinel_ids for i in ids) == 3
        if layout == "spm":
            assert ids[1] == tok.fim_hole_id
        assert undo_fim(ids, tok) == text, repr(text)
        assert undo_fim(ids[:-1], tok) == text  # without eos too


def test_psm_layout_is_the_papers(tok):
    text = "def add(a, b):\n    return a + b\n"
    prefix, middle, suffix = fim_split(text, np.random.default_rng(3))
    assert prefix and middle and suffix  # this seed cuts inside, so every sentinel position is informative
    ids = fim_tokens(text, np.random.default_rng(3), tok, mode="psm")
    p, s, m = tok.encode(prefix), tok.encode(suffix), tok.encode(middle)
    # <｜fim▁begin｜> f_pre <｜fim▁hole｜> f_suf <｜fim▁end｜> f_middle
    assert ids == [tok.fim_begin_id, *p, tok.fim_hole_id, *s, tok.fim_end_id, *m]
    assert ids.index(tok.fim_hole_id) == 1 + len(p) and ids.index(tok.fim_end_id) == 2 + len(p) + len(s)
    # The training layout is exactly the inference prompt followed by the middle.
    assert tok.decode(ids) == tok.fim_prompt(prefix, suffix) + middle
    assert tok.encode(tok.fim_prompt(prefix, suffix) + middle, allow_special=True) == ids
    with_eos = document_tokens(text, np.random.default_rng(0), tok, fim_rate=1.0)
    assert with_eos[-1] == tok.eos_id and with_eos[0] == tok.fim_begin_id


@pytest.mark.parametrize("mode", ["psm", "spm"])
def test_training_and_inference_share_one_layout(tok, mode):
    """Training examples and the inference prompt come from the same builder (dscoder.tokenizer.fim_layout): the
    prompt is the training example without its middle (PSM: up to fim_end; SPM: up to the end of the prefix), and a
    sentinel's spelling stays text."""
    text = f"def f(x):\n    s = '{FIM_HOLE_TOKEN}'\n    return x + 1\n"
    prefix, middle, suffix = fim_split(text, np.random.default_rng(5))
    ids = fim_tokens(text, np.random.default_rng(5), tok, mode=mode)
    assert ids == tok.fim_ids(prefix, suffix, middle, mode=mode)
    prompt = tok.fim_ids(prefix, suffix, mode=mode)
    assert ids == prompt + tok.encode(middle)
    assert prompt[-1] == tok.fim_end_id if mode == "psm" else prompt[-len(tok.encode(prefix)) - 1] == tok.fim_end_id
    assert undo_fim(ids, tok) == text
    if mode == "psm":
        plain = "def g(y):\n    return y\n"
        assert tok.encode(tok.fim_prompt(plain[:9], plain[9:]), allow_special=True) == tok.fim_ids(plain[:9], plain[9:])
    with pytest.raises(DscoderError, match="FIM mode must be one of psm, spm"):
        tok.fim_ids(prefix, suffix, mode="pms")


def test_spm_layout(tok):
    text = "for i in range(10):\n    print(i)\n"
    prefix, middle, suffix = fim_split(text, np.random.default_rng(5))
    assert prefix and middle and suffix
    ids = fim_tokens(text, np.random.default_rng(5), tok, mode="spm")
    assert ids == [tok.fim_begin_id, tok.fim_hole_id, *tok.encode(suffix), tok.fim_end_id,
                   *tok.encode(prefix), *tok.encode(middle)]


def test_fim_split_cuts_uniformly_with_both_ends_included():
    rng = np.random.default_rng(0)
    counts: dict[tuple[int, int], int] = {}
    n = 6000
    for _ in range(n):
        prefix, middle, suffix = fim_split("ab", rng)
        assert prefix + middle + suffix == "ab"
        key = (len(prefix), len(prefix) + len(middle))
        counts[key] = counts.get(key, 0) + 1
    # Two independent uniform cuts over {0, 1, 2}, sorted: (i, i) has probability 1/9, (i, j) with i < j 2/9.
    assert set(counts) == {(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)}
    for (lo, hi), c in counts.items():
        p = (1 if lo == hi else 2) / 9
        assert abs(c - n * p) < 6 * math.sqrt(n * p * (1 - p)), (lo, hi, c)
    assert fim_split("", rng) == ("", "", "")


def test_fim_and_spm_rates_match_their_probabilities(tok):
    n = 2000
    rng = np.random.default_rng(11)
    n_fim = sum(document_tokens("x = 1\n", rng, tok)[0] == tok.fim_begin_id for _ in range(n))
    assert abs(n_fim - 0.5 * n) < 6 * math.sqrt(n * 0.25)  # 6 sigma of Binomial(n, 0.5)
    # PSM with an empty prefix looks like SPM; a 600-character document makes that rare (P < 2/601 per document).
    text = "x = 1\n" * 100
    n_spm = sum(document_tokens(text, rng, tok, fim_rate=1.0, spm_rate=0.3)[1] == tok.fim_hole_id for _ in range(n))
    assert abs(n_spm - 0.3 * n) < 6 * math.sqrt(n * 0.3 * 0.7) + 2 * n / 601
    assert all(document_tokens(text, rng, tok, fim_rate=0.0)[0] != tok.fim_begin_id for _ in range(50))


def test_same_seed_same_tokens_other_seed_other_tokens(tok, documents):
    def run(seed: int) -> list[list[int]]:
        rng = np.random.default_rng(seed)
        return [document_tokens(d, rng, tok, fim_rate=0.5, spm_rate=0.5) for d in documents[:100]]

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_bad_arguments(tok):
    rng = np.random.default_rng(0)
    for name, kwargs in [("fim_rate", dict(fim_rate=1.5)), ("fim_rate", dict(fim_rate=-0.1)),
                         ("spm_rate", dict(spm_rate=2)), ("fim_rate", dict(fim_rate="0.5"))]:
        with pytest.raises(DscoderError, match=name):
            document_tokens("abc", rng, tok, **kwargs)
    with pytest.raises(DscoderError, match="FIM mode"):
        fim_tokens("abc", rng, tok, mode="pms")
    with pytest.raises(ValueError, match="not a FIM sequence"):
        undo_fim([tok.fim_begin_id, *tok.encode("abc"), tok.fim_end_id], tok)


def test_tokenizer_without_fim_tokens_is_refused(tok):
    class NoFim:
        eos_id, fim_begin_id, fim_hole_id, fim_end_id = 1, None, None, None
        encode, decode = tok.encode, tok.decode

    rng = np.random.default_rng(0)
    with pytest.raises(DscoderError, match="fim_begin, fim_hole and fim_end"):
        document_tokens("abc", rng, NoFim(), fim_rate=1.0)
    assert document_tokens("abc", rng, NoFim(), fim_rate=0.0) == [*tok.encode("abc"), 1]
