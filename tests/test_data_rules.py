"""Quality rules, n-gram tools and decontamination in isolation."""

from __future__ import annotations

import numpy as np
import pytest
from datasketch import MinHash

from dscoder.data.decontam import Decontaminator, humaneval_items
from dscoder.data.ngrams import MinHasher, code_tokens, ngram_hashes, token_hashes
from dscoder.data.rules import RuleConfig, check
from dscoder.errors import ConfigError

CODE = "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n"


def test_thresholds_are_config_values():
    long_line = CODE + "x = '" + "word " * 300 + "'\n"
    assert check(long_line, "Python", RuleConfig()) == "max_line_length"
    relaxed = RuleConfig.from_overrides({"max_line_length": "2000", "max_avg_line_length": "1000"})
    assert check(long_line, "Python", relaxed) is None
    assert check("1 2 3 4 5 6 7 8 9 0 = + - * /\n" * 3, "Python", RuleConfig()) == "alpha_fraction"
    assert check("# x\n" * 2000 + CODE, "Python", RuleConfig(max_lines=100)) == "too_many_lines"
    with pytest.raises(ConfigError, match="unknown data rule 'max_len'"):
        RuleConfig.from_overrides({"max_len": "3"})
    assert RuleConfig.from_overrides({"languages": "Python, Rust"}).languages == ["Python", "Rust"]


def test_long_lines_allowed_where_starcoder2_allows_them():
    md = "# Title\n\n" + "word " * 400 + "\n"
    assert check(md, "Markdown", RuleConfig()) is None
    assert check(md, "Python", RuleConfig()) == "max_line_length"


def test_xml_rule_spares_xslt_and_text_builds_skip_code_rules():
    xml = '<?xml version="1.0"?>\n<root>' + "<item>some text here</item>\n" * 10 + "</root>\n"
    assert check(xml, "XML", RuleConfig()) == "xml"
    xsl = xml.replace("<root>", '<xsl:stylesheet version="1.0">')
    assert check(xsl, "XSLT", RuleConfig()) is None
    assert check(xml, "Text", RuleConfig(code_rules=False)) is None


def test_encoded_data_by_length_and_by_fraction():
    assert check(CODE + "B = '" + "QUJD" * 300 + "'\n", "Python", RuleConfig(max_line_length=10**6,
                 max_avg_line_length=10**6)) == "encoded_data"
    many_small = "".join(f"k{i} = '{'ab' * 40}'\n" for i in range(30))  # 80-char runs, most of the file
    assert check(many_small, "Python", RuleConfig()) == "encoded_data"
    assert check(CODE, "Python", RuleConfig()) is None


def test_minhash_equals_datasketch_and_finds_near_copies():
    text = open(__file__).read()
    hasher = MinHasher()
    shingles = ngram_hashes(token_hashes(code_tokens(text)), 5)
    ref = MinHash(num_perm=256, seed=42, hashfunc=lambda x: x)
    ref.update_batch(np.unique((shingles & np.uint64(0xFFFFFFFF)).astype(np.uint32)))
    assert np.array_equal(hasher.signature(text), ref.hashvalues)
    near = text.replace("assert", "assert  ", 3) + "\n# one more line\n"
    other = "\n".join(reversed(text.splitlines()))
    sim = lambda a, b: hasher.to_datasketch(hasher.signature(a)).jaccard(hasher.to_datasketch(hasher.signature(b)))  # noqa: E731
    assert sim(text, near) > 0.9 and sim(text, other) < 0.7
    assert hasher.signature("a b c") is None  # fewer than 5 tokens: not deduplicated


def test_decontamination_ignores_layout_but_not_content():
    problem = humaneval_items()[1]  # HumanEval/0 prompt + solution
    dec = Decontaminator([problem])
    reformatted = "\n\n".join(line.strip() for line in problem.splitlines())
    assert dec.hit("# header\n" + reformatted)
    assert not dec.hit(CODE * 20)
    assert not dec.hit("numbers = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]\n" * 3)
    short = Decontaminator(["assert is_even(42) == True"])  # 4 tokens: must appear whole
    assert short.hit("x = 1\nassert is_even(42)==True\n") and not short.hit("assert is_even(x)\n")


# ----- fast paths equal their plain references ---------------------------------------------------------------------
def _stdlib_sample(n: int = 120) -> list[str]:
    import sysconfig
    from pathlib import Path

    paths = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:n]
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths]


ODD = ["", "abc", "café ünïcode 日本語 e\u0301", "x_1 = 0x1F, 0x2e, 0x3d, 0x4c, 0x5b, 0x6a, 0x79, 0x88, 0x97\n",
       "\\x00\\x01\\x02\\x03\\x04\\x05\\x06\\x07\\x08\\x09", "de ad be ef ca fe ba be 00 11 22", "٣٤٥ １２ ½ Ω",
       "a" * 70 + "\n" + "QUJD" * 40, "\\u00e9" * 12]


def test_alpha_count_and_hex_scan_equal_the_plain_regexes():
    import re

    from dscoder.data import rules

    plain_hex = re.compile(rules._HEX_PATTERN)
    for text in _stdlib_sample() + ODD:
        assert rules.count_alpha(text) == len(rules._ALPHA.findall(text))
        assert rules.count_alpha(text, alnum=True) == len(rules._ALNUM.findall(text))
        assert [m.span() for m in rules._HEX.finditer(text)] == [m.span() for m in plain_hex.finditer(text)]
    assert any(rules._HEX.search(t) for t in ODD)  # the sample holds hex runs


def test_minhash_signature_equals_datasketchs_update_batch():
    hasher = MinHasher()
    for text in _stdlib_sample(60) + ODD:
        fast, plain = hasher.signature(text), hasher.signature_reference(text)
        assert (fast is None and plain is None) or (fast.dtype == plain.dtype and np.array_equal(fast, plain))


def test_decontamination_prefilter_changes_no_answer():
    items = humaneval_items()
    dec, plain = Decontaminator(items), Decontaminator(items)
    plain.seen[:] = True  # no prefilter: every query goes to the exact search
    texts = _stdlib_sample() + ODD + [items[1], "# x\n" + items[4][40:400], items[7][:60]]
    answers = [dec.hit(t) for t in texts]
    assert answers == [plain.hit(t) for t in texts] and any(answers) and not all(answers)
    # and the n-grams built up one length at a time equal ngram_hashes from scratch, table by table
    from dscoder.data.decontam import N, _any_in, _hashes

    def from_scratch(text):
        hashes = _hashes(text)
        return _any_in(ngram_hashes(hashes, N), dec.long) or any(
            _any_in(ngram_hashes(hashes, n), table) for n, table in dec.short.items())
    assert answers == [from_scratch(t) for t in texts]
    short_only = Decontaminator(["assert is_even(42) == True"])
    assert short_only.hit("x = 1\nassert is_even(42)==True\n") and not short_only.hit("assert is_even(x)\n")
