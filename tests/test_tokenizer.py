"""Tokenizer: DeepSeek's exact special tokens, lossless round trips, ids read from files, agreement with
transformers (ids and chat template), no special-token injection, vocab size, and one-line errors."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as BackendTokenizer

from dscoder.config import PRESETS
from dscoder.errors import DscoderError
from dscoder.tokenizer import (BOS_TOKEN, CHAT_TEMPLATE, EOS_TOKEN, FIM_BEGIN_TOKEN, FIM_END_TOKEN, FIM_HOLE_TOKEN,
                               PAD_TOKEN, SPECIAL_TOKENS, Tokenizer)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
BAR, BLOCK = "\uff5c", "\u2581"  # FULLWIDTH VERTICAL LINE, LOWER ONE EIGHTH BLOCK

TRICKY = [
    "", " ", "x", "  trailing spaces  ", "\ttabs\tand\t\ttabs\t", "windows\r\nline\r\nends\r\n", "\r", "\n\n\n",
    "emoji 🎉👍🏽 and a family 👨‍👩‍👧‍👦", "中文字符和日本語のテキスト", "한국어", "combining e\u0301 and \u00e9",
    "NUL\x00 and \x7f and \x1b[31m", "zero\u200bwidth\ufeffbom", "12345678901234567890 3.14159",
    "def f(x):\n    return x  # café\n\n", "Ω≈ç√∫˜µ≤≥÷", "\U0010ffff\U000e0001 private \ue000",
    f"text mentioning {BOS_TOKEN} and {FIM_BEGIN_TOKEN}x{FIM_HOLE_TOKEN}y{FIM_END_TOKEN} and {PAD_TOKEN}",
]
MESSAGES = [
    {"role": "system", "content": "You are a helpful coder."},
    {"role": "user", "content": "Write quicksort."},
    {"role": "assistant", "content": "def qs(a): ..."},
    {"role": "user", "content": "Now in C."},
]


def stdlib_texts(n_files: int = 60, chunk: int = 2000) -> list[str]:
    """A few hundred chunks of real Python from the installed standard library."""
    texts = []
    for path in sorted(STDLIB.glob("*.py"))[:n_files]:
        source = path.read_text(encoding="utf-8")
        texts += [source[i:i + chunk] for i in range(0, min(len(source), 5 * chunk), chunk)]
    return texts


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(stdlib_texts(), vocab_size=1024)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory) -> Path:
    return tok.save(tmp_path_factory.mktemp("tok"))


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def test_special_tokens_are_spelled_exactly_as_deepseek():
    assert BOS_TOKEN == f"<{BAR}begin{BLOCK}of{BLOCK}sentence{BAR}>"
    assert EOS_TOKEN == f"<{BAR}end{BLOCK}of{BLOCK}sentence{BAR}>"
    assert PAD_TOKEN == f"<{BAR}{BLOCK}pad{BLOCK}{BAR}>"
    assert FIM_HOLE_TOKEN == f"<{BAR}fim{BLOCK}hole{BAR}>"
    assert FIM_END_TOKEN == f"<{BAR}fim{BLOCK}end{BAR}>"
    # The bytes of DeepSeek-Coder issue #27's hexdump.
    assert FIM_BEGIN_TOKEN.encode("utf-8").hex(" ") == "3c ef bd 9c 66 69 6d e2 96 81 62 65 67 69 6e ef bd 9c 3e"
    assert [hex(ord(c)) for c in FIM_BEGIN_TOKEN[:2]] == ["0x3c", "0xff5c"]


def test_trained_special_ids_match_the_tiny_preset(tok):
    assert (tok.bos_id, tok.eos_id) == (PRESETS["tiny"]["bos_token_id"], PRESETS["tiny"]["eos_token_id"])
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.pad_id, tok.fim_hole_id, tok.fim_begin_id, tok.fim_end_id) == (2, 3, 4, 5)
    for token in SPECIAL_TOKENS:  # each special token is one id when allowed
        assert tok.encode(token, allow_special=True) == [tok.token_to_id(token)]


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_lossless(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, add_bos=True), skip_special=True) == text


def test_round_trip_of_random_unicode_and_real_files(tok):
    rng = np.random.default_rng(0)
    code_points = [c for c in rng.integers(0, 0x110000, size=4000) if not 0xD800 <= c <= 0xDFFF]  # no surrogates
    text = "".join(map(chr, code_points))
    assert tok.decode(tok.encode(text)) == text
    for path in [STDLIB / "textwrap.py", STDLIB / "json" / "decoder.py"]:
        source = path.read_text(encoding="utf-8")
        ids = tok.encode(source)
        assert len(ids) < len(source.encode("utf-8")) / 2  # BPE learned real merges, not bytes only
        assert tok.decode(ids) == source


def test_special_tokens_in_text_are_not_parsed_unless_allowed(tok):
    special = {tok.token_to_id(t) for t in SPECIAL_TOKENS}
    text = f"user says {EOS_TOKEN} then {FIM_BEGIN_TOKEN}"
    plain = tok.encode(text)
    assert not special & set(plain)
    assert not special & {i for ids in tok.encode_batch([text, BOS_TOKEN]) for i in ids}
    allowed = tok.encode(text, allow_special=True)
    assert tok.eos_id in allowed and tok.fim_begin_id in allowed
    assert tok.decode(plain) == tok.decode(allowed) == text
    assert tok.decode(allowed, skip_special=True) == "user says  then "


def test_encode_batch_add_bos_and_decode_of_arrays(tok):
    texts = TRICKY[:8]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, add_bos=True) == [[tok.bos_id, *tok.encode(t)] for t in texts]
    ids = tok.encode("hello world")
    assert tok.decode(np.asarray(ids, dtype=np.uint32)) == "hello world"
    with pytest.raises(TypeError):
        tok.encode_batch("one string")


def test_fim_prompt_is_psm_with_deepseek_sentinels(tok):
    prompt = tok.fim_prompt("def f(x):\n    ", "\n    return y\n")
    assert prompt == f"{FIM_BEGIN_TOKEN}def f(x):\n    {FIM_HOLE_TOKEN}\n    return y\n{FIM_END_TOKEN}"
    ids = tok.encode(prompt, allow_special=True)
    assert ids[0] == tok.fim_begin_id and ids[-1] == tok.fim_end_id
    assert ids.index(tok.fim_hole_id) == 1 + len(tok.encode("def f(x):\n    "))


def test_chat_template_golden_string(tok):
    golden = ("<｜begin▁of▁sentence｜>You are a helpful coder.\n\nUser: Write quicksort.\n\n"
              "Assistant: def qs(a): ...<｜end▁of▁sentence｜>User: Now in C.\n\nAssistant:")
    assert tok.apply_chat_template(MESSAGES) == golden
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=False) == golden.removesuffix("Assistant:")
    single = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert single == f"{BOS_TOKEN}User: hi\n\nAssistant:" and not single.endswith(" ")


@pytest.mark.parametrize("messages, expected", [
    ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
    ([{"role": "user"}], "'content' must be a string, got nothing"),
    ([{"role": "user", "content": 3}], "'content' must be a string, got int"),
    (["User: hi"], "expected an object"),
    ("User: hi", "must be a list"),
])
def test_bad_chat_messages_raise_one_line(tok, messages, expected):
    with pytest.raises(DscoderError) as excinfo:
        tok.apply_chat_template(messages)
    assert expected in one_line_error(excinfo)


def test_text_with_lone_surrogates_is_one_line(tok):
    """Undecodable bytes reach Python as lone surrogates (argv, a stdin in the C locale, a JSON "\\ud800" escape):
    one line saying where, not the tokenizers library's TypeError."""
    for text in ("a\udcff", "\ud800 x"):
        for encode in (lambda t: tok.encode(t), lambda t: tok.encode(t, allow_special=True),
                       lambda t: tok.encode_batch(["fine", t])):
            with pytest.raises(DscoderError) as excinfo:
                encode(text)
            assert "not valid Unicode: a lone surrogate" in one_line_error(excinfo)
    with pytest.raises(TypeError):  # other mistakes stay what they are
        tok.encode(5)


def test_save_load_round_trip(tok, saved):
    assert {p.name for p in saved.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    config = json.loads((saved / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["chat_template"] == CHAT_TEMPLATE
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    loaded = Tokenizer.load(saved)
    assert loaded.vocab_size == tok.vocab_size
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert (loaded.fim_begin_id, loaded.fim_hole_id, loaded.fim_end_id) == (4, 3, 5)
    assert [loaded.encode(t) for t in TRICKY] == [tok.encode(t) for t in TRICKY]


def deepseek_shaped_dir(tok: Tokenizer, directory: Path, *, fim: bool, fim_special: bool) -> Path:
    """A tokenizer laid out like DeepSeek's: control tokens appended after the BPE vocabulary (so their ids are not
    0..5), the config naming tokens as {"content": ...} objects, pad = the eos string, its own chat template."""
    spec = json.loads(tok.backend.to_str())
    spec["added_tokens"], spec["post_processor"] = [], None
    vocab = spec["model"]["vocab"]
    for t in SPECIAL_TOKENS:
        vocab.pop(t)
    vocab = {t: i for i, t in enumerate(sorted(vocab, key=vocab.get))}  # renumber 0..n-1 without the specials
    spec["model"]["vocab"] = vocab
    backend = BackendTokenizer.from_str(json.dumps(spec))
    backend.add_special_tokens([BOS_TOKEN, EOS_TOKEN])
    if fim:  # real checkpoints may flag the sentinels as ordinary added tokens
        add = backend.add_special_tokens if fim_special else backend.add_tokens
        add([FIM_HOLE_TOKEN, FIM_BEGIN_TOKEN, FIM_END_TOKEN])
    directory.mkdir()
    backend.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "LlamaTokenizerFast", "add_bos_token": True, "model_max_length": 16384,
              "bos_token": {"__type": "AddedToken", "content": BOS_TOKEN, "lstrip": False},
              "eos_token": {"__type": "AddedToken", "content": EOS_TOKEN, "lstrip": False},
              "pad_token": {"__type": "AddedToken", "content": EOS_TOKEN, "lstrip": False},
              "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return directory


@pytest.mark.parametrize("fim_special", [True, False])
def test_special_ids_are_read_from_the_file(tok, tmp_path, fim_special):
    directory = deepseek_shaped_dir(tok, tmp_path / "ds", fim=True, fim_special=fim_special)
    loaded = Tokenizer.load(directory)
    n = tok.vocab_size - len(SPECIAL_TOKENS)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (n, n + 1, n + 1)  # pad is the eos string here
    assert (loaded.fim_hole_id, loaded.fim_begin_id, loaded.fim_end_id) == (n + 2, n + 3, n + 4)
    assert loaded.model_max_length == 16384
    # Its own template is kept for export, but the Python rendering stays DeepSeek's format.
    assert loaded.chat_template.startswith("{{ bos_token }}{% for m in messages %}")
    assert loaded.apply_chat_template(MESSAGES) == tok.apply_chat_template(MESSAGES)
    # Sentinels are not injectable even when the file does not flag them special; they are skipped on request.
    text = f"a{FIM_BEGIN_TOKEN}b{EOS_TOKEN}"
    assert not {loaded.fim_begin_id, loaded.eos_id} & set(loaded.encode(text))
    allowed = loaded.encode(text, allow_special=True)
    assert loaded.fim_begin_id in allowed and loaded.decode(allowed) == text
    assert loaded.decode(allowed, skip_special=True) == "ab"


def test_missing_fim_tokens_give_none(tok, tmp_path):
    loaded = Tokenizer.load(deepseek_shaped_dir(tok, tmp_path / "nofim", fim=False, fim_special=False))
    assert loaded.bos_id == tok.vocab_size - len(SPECIAL_TOKENS)
    assert (loaded.fim_begin_id, loaded.fim_hole_id, loaded.fim_end_id) == (None, None, None)
    assert not loaded.has_fim
    with pytest.raises(DscoderError, match="no FIM tokens"):
        loaded.fim_prompt("a", "b")


def test_transformers_agrees_on_ids_decoding_and_chat_template(tok, saved, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(saved))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert len(hf) == tok.vocab_size
    texts = [t for t in TRICKY if BAR not in t] + stdlib_texts(n_files=3)  # HF always parses special strings
    for text in texts:
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text), repr(text)
        assert hf(text)["input_ids"] == tok.encode(text, add_bos=True), repr(text)  # add_bos_token is honoured
        assert hf.decode(tok.encode(text)) == text
    prompt = tok.fim_prompt("x = ", "\nprint(x)")
    assert hf(prompt, add_special_tokens=False)["input_ids"] == tok.encode(prompt, allow_special=True)
    for add_generation_prompt in (True, False):
        ours = tok.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
        theirs = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert theirs == ours
    with pytest.raises(Exception, match="unknown chat role"):  # the Jinja copy rejects what ours rejects
        hf.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)
    no_bos = Tokenizer.load(saved)
    no_bos.add_bos_token = False
    hf_no_bos = transformers.AutoTokenizer.from_pretrained(str(no_bos.save(tmp_path / "no_bos")))
    assert hf_no_bos("x = 1")["input_ids"] == tok.encode("x = 1")


def test_vocab_size_is_respected_and_validated():
    texts = stdlib_texts(n_files=20)
    for vocab_size in (262, 300, 700):
        assert Tokenizer.train(texts, vocab_size=vocab_size).vocab_size == vocab_size
    # Too little data for the requested merges: the vocabulary stops short, never exceeds the request.
    small = Tokenizer.train(["abc abd"] * 3, vocab_size=5000)
    assert 262 <= small.vocab_size < 300
    assert small.decode(small.encode("any text 😀")) == "any text 😀"
    for bad in (261, 0, 1000.0, "8192"):
        with pytest.raises(DscoderError) as excinfo:
            Tokenizer.train(texts, vocab_size=bad)
        assert "vocab_size must be an integer >= 262" in one_line_error(excinfo)
    with pytest.raises(DscoderError, match="vocab_size must be at most 16,777,216"):  # 10**9 aborted the process
        Tokenizer.train(texts, vocab_size=10**9)
    with pytest.raises(DscoderError, match="min_frequency"):
        Tokenizer.train(texts, min_frequency=0)
    with pytest.raises(DscoderError, match="not a single string"):
        Tokenizer.train("one long string")


def test_load_errors_are_one_line_naming_the_file(tok, saved, tmp_path):
    with pytest.raises(DscoderError) as excinfo:
        Tokenizer.load(tmp_path / "nowhere")
    assert "nowhere" in one_line_error(excinfo)

    (tmp_path / "empty").mkdir()
    with pytest.raises(DscoderError) as excinfo:
        Tokenizer.load(tmp_path / "empty")
    assert str(tmp_path / "empty" / "tokenizer.json") in one_line_error(excinfo)

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ', encoding="utf-8")
    with pytest.raises(DscoderError) as excinfo:
        Tokenizer.load(corrupt)
    assert str(corrupt / "tokenizer.json") in one_line_error(excinfo)

    bad_config = tmp_path / "bad_config"
    tok.save(bad_config)
    (bad_config / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DscoderError) as excinfo:
        Tokenizer.load(bad_config)
    assert str(bad_config / "tokenizer_config.json") in one_line_error(excinfo)

    (bad_config / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<nope>"}), encoding="utf-8")
    with pytest.raises(DscoderError) as excinfo:
        Tokenizer.load(bad_config)
    assert "bos token '<nope>' is not in the vocabulary" in one_line_error(excinfo)
    assert "tokenizer.json" in str(excinfo.value)
