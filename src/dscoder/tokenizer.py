"""Byte-level BPE tokenizer with DeepSeek's special tokens, the FIM prompt and the chat template.

A thin wrapper over the Rust ``tokenizers`` library. A directory written by :meth:`Tokenizer.save` is a Hugging Face
tokenizer directory (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``) that
``transformers.AutoTokenizer`` loads with the same ids and chat template; :meth:`Tokenizer.load` reads such a
directory, including the one shipped with a real DeepSeek-Coder-V2 checkpoint.

Special-token ids are always looked up in the vocabulary, never assumed: DeepSeek-Coder-V2 has bos 100000 and
eos 100001, a tokenizer trained here has bos 0 and eos 1 (the ``tiny`` preset's ids), and a tokenizer may lack the
FIM tokens (their ids are then ``None``).

Special-token strings that appear in ordinary text (a user prompt, a source file that mentions
``<｜end▁of▁sentence｜>``) are encoded as plain bytes unless ``allow_special=True``, so data can never inject a
control token.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from itertools import chain
from pathlib import Path
from typing import Any, TypeVar

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer

from dscoder.errors import ConfigError, DscoderError
from dscoder.io import write_text

# Spelled as DeepSeek does: "｜" is U+FF5C FULLWIDTH VERTICAL LINE and "▁" is U+2581 LOWER ONE EIGHTH BLOCK.
BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
FIM_HOLE_TOKEN = "<｜fim▁hole｜>"    # DeepSeek's name for the sentinel that marks where the *suffix* starts
FIM_BEGIN_TOKEN = "<｜fim▁begin｜>"
FIM_END_TOKEN = "<｜fim▁end｜>"
# This order gives the ids of a trained tokenizer: bos 0, eos 1 (as the tiny preset), pad 2, hole/begin/end 3/4/5
# (the hole/begin/end order of DeepSeek's later tokenizers).
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, FIM_HOLE_TOKEN, FIM_BEGIN_TOKEN, FIM_END_TOKEN)
MAX_VOCAB = 1 << 24  # far past any BPE in use; the trainer reserves memory by it (1e9 aborts the process)

# DeepSeek-V2 / Coder-V2 Instruct format: bos, then "{system}\n\n", "User: {u}\n\n", "Assistant: {a}<eos>", and the
# generation prompt "Assistant:" with no trailing space. `Tokenizer.apply_chat_template` is the reference rendering;
# this Jinja copy is written to tokenizer_config.json so transformers renders the same string.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
CHAT_ROLES = ("system", "user", "assistant")
FIM_MODES = ("psm", "spm")

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 saves the template; read if the config has none
DEFAULT_MODEL_MAX_LENGTH = 163840  # max_position_embeddings of DeepSeek-Coder-V2(-Lite)
_BYTE_ALPHABET = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins of byte-level BPE


def _check_unicode(texts: Sequence[str]) -> None:
    """A text holding a lone surrogate (undecodable bytes passed through, e.g. from argv, or a JSON escape such as
    "\\ud800") cannot be tokenized: one line saying where, instead of the tokenizers library's TypeError."""
    for text in texts:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise DscoderError(f"the text is not valid Unicode: a lone surrogate {text[e.start]!r} at character "
                                   f"{e.start} (undecodable bytes?)") from None


class Tokenizer:
    """DeepSeek-style byte-level BPE tokenizer.

    ``backend`` is the ``tokenizers.Tokenizer`` that does the work; the token strings name the vocabulary entries used
    as bos / eos / pad. ``chat_template`` is the Jinja string kept for export (a loaded checkpoint's own, or
    ``CHAT_TEMPLATE``); :meth:`apply_chat_template` always renders the DeepSeek format in Python. ``source`` names
    the file in error messages.
    """

    def __init__(self, backend: BackendTokenizer, *, bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN,
                 pad_token: str = PAD_TOKEN, chat_template: str | None = None, add_bos_token: bool = True,
                 model_max_length: int = DEFAULT_MODEL_MAX_LENGTH, source: str = "tokenizer"):
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template if chat_template is not None else CHAT_TEMPLATE
        self.add_bos_token = add_bos_token
        self.model_max_length = model_max_length
        self._bos_id = self._required_id("bos", bos_token, source)
        self._eos_id = self._required_id("eos", eos_token, source)
        self._pad_id = self._required_id("pad", pad_token, source)
        self._fim_ids = {t: backend.token_to_id(t) for t in (FIM_BEGIN_TOKEN, FIM_HOLE_TOKEN, FIM_END_TOKEN)}
        controls = {bos_token, eos_token, pad_token, *self._fim_ids}
        self._special_ids = {i for i in (backend.token_to_id(t) for t in controls) if i is not None}
        self._plain = _without_special_parsing(backend, controls)
        self._fast: dict[bool, FastEncoder | None] = {}  # by allow_special, built on first use

    def _required_id(self, role: str, token: str, source: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise DscoderError(f"{source}: {role} token {token!r} is not in the vocabulary")
        return token_id

    # ------------------------------------------------------------------ training, loading, saving

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2, *,
              show_progress: bool = False) -> Tokenizer:
        """Train byte-level BPE on ``texts``; ``vocab_size`` counts the 256 byte tokens and the special tokens.

        No normalizer and DeepSeek's own pre-tokenizer (:func:`deepseek_pre_tokenizer`: digits in runs of 1-3, CJK
        runs, a code-aware split), as the paper reuses DeepSeek-V2's tokenizer, so every string encodes and decodes
        back unchanged and :class:`FastEncoder` applies. The vocabulary may come out smaller than ``vocab_size`` when
        ``texts`` has too few pairs seen ``min_frequency`` times.
        """
        if isinstance(texts, str):
            raise ConfigError("tokenizer training texts must be an iterable of strings, not a single string")
        minimum = len(_BYTE_ALPHABET) + len(SPECIAL_TOKENS)
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < minimum:
            raise ConfigError(f"vocab_size must be an integer >= {minimum} (256 byte tokens + "
                              f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size!r}")
        if vocab_size > MAX_VOCAB:
            raise ConfigError(f"vocab_size must be at most {MAX_VOCAB:,} (DeepSeek-Coder-V2's is 102,400), got "
                              f"{vocab_size:,}")
        if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
            raise ConfigError(f"min_frequency must be an integer >= 1, got {min_frequency!r}")
        backend = BackendTokenizer(models.BPE())
        backend.pre_tokenizer = deepseek_pre_tokenizer()
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
            special_tokens=[_added_token(t) for t in SPECIAL_TOKENS],
            initial_alphabet=_BYTE_ALPHABET,  # every byte gets a token even if unseen, so nothing is ever unknown
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend)

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Read an HF tokenizer directory: ``tokenizer.json`` and, if present, ``tokenizer_config.json``."""
        directory = Path(directory)
        if not directory.is_dir():
            raise DscoderError(f"{directory}: not a tokenizer directory (missing or not a folder)")
        path = directory / TOKENIZER_FILE
        if not path.is_file():
            raise DscoderError(f"{path}: missing (a tokenizer directory needs {TOKENIZER_FILE})")
        try:
            backend = BackendTokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises a bare Exception for every parse error
            raise DscoderError(f"{path}: not a valid {TOKENIZER_FILE} ({_one_line(e)})") from None

        config_path = directory / CONFIG_FILE
        config = _read_json_object(config_path) if config_path.is_file() else {}
        bos = _token_field(config, "bos_token", config_path) or BOS_TOKEN
        eos = _token_field(config, "eos_token", config_path) or EOS_TOKEN
        # DeepSeek-V2 configs name the eos string as pad; without a config use our pad token when it exists.
        pad = _token_field(config, "pad_token", config_path)
        if pad is None:
            pad = PAD_TOKEN if backend.token_to_id(PAD_TOKEN) is not None else eos
        add_bos = config.get("add_bos_token", True)
        if not isinstance(add_bos, bool):
            raise DscoderError(f"{config_path}: field 'add_bos_token' must be true or false, got {add_bos!r}")
        max_length = config.get("model_max_length", DEFAULT_MODEL_MAX_LENGTH)
        if isinstance(max_length, bool) or not isinstance(max_length, (int, float)) or max_length < 1:
            raise DscoderError(f"{config_path}: field 'model_max_length' must be a positive number, got {max_length!r}")
        return cls(backend, bos_token=bos, eos_token=eos, pad_token=pad,
                   chat_template=_read_chat_template(config, directory), add_bos_token=add_bos,
                   model_max_length=int(max_length), source=str(path))

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` (atomically each).

        ``transformers.AutoTokenizer.from_pretrained(directory)`` then gives the same ids (``add_special_tokens``
        prepends bos when ``add_bos_token``) and renders ``chat_template``.
        """
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise DscoderError(f"{directory}: exists and is not a folder; choose another tokenizer folder")
        directory.mkdir(parents=True, exist_ok=True)
        backend = BackendTokenizer.from_str(self.backend.to_str())
        # transformers' generic fast tokenizer ignores add_bos_token and runs the file's post-processor instead.
        backend.post_processor = (
            processors.TemplateProcessing(single=f"{self.bos_token} $A", pair=f"{self.bos_token} $A $B:1",
                                          special_tokens=[(self.bos_token, self.bos_id)])
            if self.add_bos_token else None
        )
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,  # the clean-up edits spaces before punctuation: lossy for code
            "model_max_length": self.model_max_length,
            "chat_template": self.chat_template,
        }
        special_map = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        write_text(directory / TOKENIZER_FILE, backend.to_str(pretty=True))
        write_text(directory / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        write_text(directory / SPECIAL_TOKENS_MAP_FILE, json.dumps(special_map, indent=2, ensure_ascii=False) + "\n")
        return directory

    # ------------------------------------------------------------------ ids

    @property
    def vocab_size(self) -> int:
        """Entries in the vocabulary, added tokens included (a model's embedding may be padded beyond it)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def fim_begin_id(self) -> int | None:
        return self._fim_ids[FIM_BEGIN_TOKEN]

    @property
    def fim_hole_id(self) -> int | None:
        return self._fim_ids[FIM_HOLE_TOKEN]

    @property
    def fim_end_id(self) -> int | None:
        return self._fim_ids[FIM_END_TOKEN]

    @property
    def has_fim(self) -> bool:
        return None not in self._fim_ids.values()

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_bos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of ``text`` ([T] ints), bos first when ``add_bos``.

        Special-token strings in ``text`` are encoded as ordinary bytes unless ``allow_special`` (use it only for
        strings built by the program, e.g. :meth:`fim_prompt` or :meth:`apply_chat_template` output).
        """
        backend = self.backend if allow_special else self._plain
        fast = self._fast_encoder(allow_special)
        try:
            ids = fast.encode(text) if fast is not None and isinstance(text, str) else None
            if ids is None:
                ids = backend.encode(text, add_special_tokens=False).ids  # bos is added here, not by the post-processor
        except TypeError:
            _check_unicode([text])
            raise
        return [self._bos_id, *ids] if add_bos else ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, allow_special: bool = False) -> list[list[int]]:
        """:meth:`encode` for many texts at once (in parallel in the Rust library)."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of strings; use encode for one string")
        backend = self.backend if allow_special else self._plain
        fast = self._fast_encoder(allow_special)
        texts = list(texts)
        try:
            out = [fast.encode(t) if isinstance(t, str) else None for t in texts] if fast else [None] * len(texts)
            rest = [i for i, ids in enumerate(out) if ids is None]
            if rest:
                for i, e in zip(rest, backend.encode_batch([texts[i] for i in rest], add_special_tokens=False)):
                    out[i] = e.ids
        except TypeError:
            _check_unicode(texts)
            raise
        return [[self._bos_id, *ids] for ids in out] if add_bos else out

    def _fast_encoder(self, allow_special: bool) -> FastEncoder | None:
        """The :class:`FastEncoder` of this tokenizer (None when its pre-tokenizer is not DeepSeek's)."""
        if allow_special not in self._fast:
            other = self._fast.get(not allow_special, False)
            backend = self.backend if allow_special else self._plain
            self._fast[allow_special] = (FastEncoder.build(backend) if other is False
                                         else other.sibling(backend) if other is not None else None)
        return self._fast[allow_special]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """The text of ``ids`` (any iterable of ints, a numpy array or a 1-D tensor); ``skip_special`` drops bos, eos,
        pad, the FIM sentinels and any token the file marks special."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        if skip_special:
            # A checkpoint's file may not mark the FIM sentinels special, so filter our control ids ourselves.
            ids = [i for i in ids if i not in self._special_ids]
        return self.backend.decode(ids, skip_special_tokens=skip_special)

    # ------------------------------------------------------------------ prompts

    def fim_ids(self, prefix: str, suffix: str, middle: str = "", mode: str = "psm") -> list[int]:
        """FIM token ids in the layout of :func:`fim_layout`, each piece encoded on its own as plain text (a
        sentinel's spelling inside a piece stays text). With ``middle=""`` this is the infilling prompt the model
        completes; training examples (:mod:`dscoder.data.fim`) are the same layout with the middle filled in."""
        self._need_fim()
        return fim_layout(self.encode(prefix), self.encode(suffix), self.encode(middle),
                          (self.fim_begin_id, self.fim_hole_id, self.fim_end_id), mode)

    def fim_prompt(self, prefix: str, suffix: str) -> str:
        """The PSM infilling prompt ``<｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>`` as text (the layout of
        :func:`fim_layout`); the model writes the middle. Encode it with ``allow_special=True``, or use
        :meth:`fim_ids`, which keeps sentinel spellings inside ``prefix`` and ``suffix`` as plain text."""
        self._need_fim()
        return "".join(fim_layout([prefix], [suffix], [], (FIM_BEGIN_TOKEN, FIM_HOLE_TOKEN, FIM_END_TOKEN)))

    def _need_fim(self) -> None:
        if not self.has_fim:
            raise DscoderError("this tokenizer has no FIM tokens "
                               f"({FIM_BEGIN_TOKEN}, {FIM_HOLE_TOKEN}, {FIM_END_TOKEN})")

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` ([{"role": "system"|"user"|"assistant", "content": str}, ...]) in the DeepSeek-Coder-V2
        format, e.g.
        ``<｜begin▁of▁sentence｜>S\\n\\nUser: Q\\n\\nAssistant: A<｜end▁of▁sentence｜>User: Q2\\n\\nAssistant:``.

        This Python rendering is the reference, whatever Jinja ``chat_template`` a loaded config carries. Encode the
        result with ``allow_special=True``; note that special-token strings inside message contents then become
        control tokens too.
        """
        if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
            raise DscoderError("chat messages must be a list of {'role': ..., 'content': ...} objects")
        parts = [self.bos_token]
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise DscoderError(f"chat message {i}: expected an object with 'role' and 'content', "
                                   f"got {type(message).__name__}")
            role, content = message.get("role"), message.get("content")
            if role not in CHAT_ROLES:
                raise DscoderError(f"chat message {i}: unknown role {role!r} (expected one of {', '.join(CHAT_ROLES)})")
            if not isinstance(content, str):
                raise DscoderError(f"chat message {i}: 'content' must be a string, got "
                                   f"{'nothing' if content is None else type(content).__name__}")
            if role == "system":
                parts.append(content + "\n\n")
            elif role == "user":
                parts.append("User: " + content + "\n\n")
            else:
                parts.append("Assistant: " + content + self.eos_token)
        if add_generation_prompt:
            parts.append("Assistant:")  # no trailing space: the model's first token carries it
        return "".join(parts)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
                f"pad_id={self.pad_id}, fim_begin/hole/end={self.fim_begin_id}/{self.fim_hole_id}/{self.fim_end_id})")


T = TypeVar("T")


def fim_layout(prefix: Sequence[T], suffix: Sequence[T], middle: Sequence[T], sentinels: tuple[T, T, T],
               mode: str = "psm") -> list[T]:
    """The one place the FIM order is written, for training examples and inference prompts alike.

    ``sentinels`` is (begin, hole, end): ids, or the token strings with one-string pieces. DeepSeek calls the
    sentinel before the suffix "hole"::

        psm: begin prefix hole suffix end middle        (DeepSeek-Coder-V2; the inference prompt has no middle)
        spm: begin hole suffix end prefix middle        (Bavarian et al. 2022, App. D: the prefix runs into the middle)
    """
    begin, hole, end = sentinels
    if mode == "psm":
        return [begin, *prefix, hole, *suffix, end, *middle]
    if mode == "spm":
        return [begin, hole, *suffix, end, *prefix, *middle]
    raise ConfigError(f"FIM mode must be one of {', '.join(FIM_MODES)}, got {mode!r}")


# ----------------------------------------------------------------------------------------------- the fast encoder
# DeepSeek's pre-tokenizer (DeepSeek-V3's tokenizer.json; DeepSeek-V2's is of the same family): digits split in runs
# of 1-3, CJK runs isolated, then a code-aware split, then byte-level mapping without its own regex.
DEEPSEEK_SPLITS = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    # as DeepSeek's file spells it: \r and \n are the characters themselves, the rest regex escapes
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^""" "\r\n" r"""\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
    r"""| ?[\p{P}\p{S}]+[""" "\r\n" r"""]*|\s*[""" "\r\n" r"""]+|\s+(?!\S)|\s+""",
)
# The code-aware split on ASCII text, in Python's re: \p{L} is [A-Za-z], \p{M} is empty, \p{P}/\p{S} are ASCII's
# punctuation/symbols by Unicode category, \s is [\t\n\v\f\r ] (Unicode White_Space; Python's str \s adds \x1c-\x1f)
_ASCII_P = re.escape("!\"#%&'()*,-./:;?@[\\]_{}")
_ASCII_S = re.escape("$+<=>^`|~")
_ASCII_SPLIT = re.compile(
    rf"""([!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{{|}}~][A-Za-z]+|[^\r\nA-Za-z{_ASCII_P}{_ASCII_S}]?[A-Za-z]+"""
    rf"""| ?[{_ASCII_P}{_ASCII_S}]+[\r\n]*|[\t\n\x0b\x0c\r ]*[\r\n]+|[\t\n\x0b\x0c\r ]+(?![^\t\n\x0b\x0c\r ])"""
    r"""|[\t\n\x0b\x0c\r ]+)""")
_ASCII_DIGITS = re.compile("([0-9]{1,3})")
_LETTER_RUN = re.compile("[^A-Za-z]*[A-Za-z]*")  # ends after each run of letters: always a piece boundary
# Python whitespace that is not a line break: stripped to find a line's first character (a superset of the regex's
# \s, so a line whose first remaining character is not whitespace starts after a piece boundary)
_INDENT = "\t\x0b\x0c\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"


def _lines_pattern(added: list[str]) -> re.Pattern:
    """Lines, each with the lines after it that do not start, past their indent, with a non-space character; and a
    line's indent but its last character, when the indent is followed by an ASCII character that is not a digit and
    does not start an added token (the split's "\\s+(?!\\S)" takes the indent less one character, and that one joins
    the word after it or stands alone; before a digit, or an added token, the indent is one piece), so a line is the
    same key at every depth."""
    starts = {t[0] for t in added if t}
    after = "".join(re.escape(c) for c in map(chr, range(0x21, 0x7F)) if not c.isdigit() and c not in starts)
    return re.compile(rf"[ \t]+(?=[ \t][{after}])|[^\n]*(?:\n(?![{_INDENT}]*\S)[^\n]*)*(?:\n|\Z)")


def deepseek_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """DeepSeek's pre-tokenizer: the three isolating splits of :data:`DEEPSEEK_SPLITS`, then byte-level mapping."""
    return pre_tokenizers.Sequence([
        *(pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in DEEPSEEK_SPLITS),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _byte_level_table() -> dict[int, str]:
    """GPT-2's byte → printable character map (the ByteLevel pre-tokenizer's), for ASCII code points."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in printable else next(extra)) for b in range(256) if b < 128}


class _CachedDict(dict):
    def __init__(self, compute):
        super().__init__()
        self.compute = compute

    def __missing__(self, key):
        value = self.compute(key)
        if len(key) <= _CACHED_KEY_CHARS:  # a minified file's one long line is not kept
            if len(self) >= _CACHE_ENTRIES:
                self.clear()
            self[key] = value
        return value


_CACHE_ENTRIES = 1 << 19
_CACHED_KEY_CHARS = 512


class FastEncoder:
    """The ids of ``backend.encode(text, add_special_tokens=False)``, exactly, for tokenizers with DeepSeek's
    pre-tokenizer (:data:`DEEPSEEK_SPLITS`, no normalizer, a BPE model), several times faster on code.

    BPE acts on each pre-tokenized piece alone, so the ids of a text are the ids of its pieces in order, and the
    pieces of a text are those of its parts when it is cut where a piece always ends. Two such cuts are used:
    after a line break when the next line has a non-space character (the split's ``\\s*[\\r\\n]+`` ends at the
    last line break of a run of spaces and breaks, and nothing else holds a line break but at its end), and,
    within ASCII lines, after a run of letters (no piece continues from a letter into a non-letter). Code repeats
    itself, so lines, letter runs and pieces are looked up in dicts; what is new is split with Python's ``re``
    (the split's ASCII translation) and given to the library's own BPE model, and a line that is not ASCII goes to
    the library whole. A text holding an ASCII added token (e.g. ``<|EOT|>``) goes to the library whole.
    :meth:`build` returns None for any other tokenizer, which then always takes the library's path.
    """

    def __init__(self, backend: BackendTokenizer, added: list[str], shared: FastEncoder | None = None):
        self.backend = backend
        self.added_tokens = added
        ascii_added = [t for t in added if t.isascii()]
        self.added = re.compile("|".join(map(re.escape, ascii_added))) if ascii_added else None
        self.line_pattern = _lines_pattern(added)
        self.lines = _CachedDict(self._line_ids)  # a line may hold a non-ASCII special token: one cache per backend
        if shared is not None:
            self.runs, self.pieces = shared.runs, shared.pieces
        else:
            model, table = backend.model, _byte_level_table()
            self.runs = _CachedDict(self._run_ids)
            self.pieces = _CachedDict(lambda piece: tuple(t.id for t in model.tokenize(piece.translate(table))))

    def sibling(self, backend: BackendTokenizer) -> FastEncoder:
        """The encoder of another copy of the same tokenizer (other added-token flags), sharing the ASCII caches."""
        return FastEncoder(backend, self.added_tokens, shared=self)

    @classmethod
    def build(cls, backend: BackendTokenizer) -> FastEncoder | None:
        # the components' own JSON, not the whole file's (a 128,000-token vocabulary takes a second to parse)
        state = lambda part: json.loads(part.__getstate__()) if part is not None else None  # noqa: E731
        normalizer, pre, model = state(backend.normalizer), state(backend.pre_tokenizer) or {}, backend.model
        if normalizer and not (normalizer.get("type") == "Sequence" and not normalizer.get("normalizers")):
            return None
        if not isinstance(model, models.BPE) or model.dropout or model.continuing_subword_prefix \
                or model.end_of_word_suffix:
            return None
        steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
        if not steps or len(steps) != len(DEEPSEEK_SPLITS) + 1:
            return None
        for step, pattern in zip(steps, DEEPSEEK_SPLITS):
            if step != {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}:
                return None
        last = steps[-1]
        if last.get("type") != "ByteLevel" or last.get("add_prefix_space") or last.get("use_regex"):
            return None
        return cls(backend, [t.content for t in backend.get_added_tokens_decoder().values()])

    def encode(self, text: str) -> list[int] | None:
        """The ids, or None when the library must encode this text (it holds an ASCII added token)."""
        if self.added is not None and self.added.search(text):
            return None
        return list(chain.from_iterable(map(self.lines.__getitem__, filter(None, self.line_pattern.findall(text)))))

    def _line_ids(self, chunk: str) -> tuple[int, ...]:
        if not chunk.isascii():
            return tuple(self.backend.encode(chunk, add_special_tokens=False).ids)
        return tuple(chain.from_iterable(map(self.runs.__getitem__, filter(None, _LETTER_RUN.findall(chunk)))))

    def _run_ids(self, run: str) -> tuple[int, ...]:
        pieces = filter(None, chain.from_iterable(map(_ASCII_SPLIT.split, _ASCII_DIGITS.split(run))))
        return tuple(chain.from_iterable(map(self.pieces.__getitem__, pieces)))


def _added_token(content: str) -> AddedToken:
    # normalized=False and no strip flags: the token matches its exact string and eats no neighbouring whitespace.
    return AddedToken(content, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)


def _without_special_parsing(backend: BackendTokenizer, controls: set[str]) -> BackendTokenizer:
    """A copy of ``backend`` that encodes every special-token string in the text as ordinary bytes.

    The library skips only added tokens flagged special, and a checkpoint's file may leave the FIM sentinels
    unflagged, so the copy flags our control tokens first. Other unflagged added tokens stay ordinary vocabulary.
    """
    spec = json.loads(backend.to_str())
    for token in spec.get("added_tokens") or []:
        if token.get("content") in controls:
            token["special"] = True
    plain = BackendTokenizer.from_str(json.dumps(spec))
    plain.encode_special_tokens = True
    return plain


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DscoderError(f"{path}: not readable JSON ({_one_line(e)})") from None
    if not isinstance(data, dict):
        raise DscoderError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_field(config: Mapping[str, Any], field: str, path: Path) -> str | None:
    """A token named in tokenizer_config.json, written either as a string or as {"content": ..., ...}."""
    value = config.get(field)
    if isinstance(value, Mapping):
        value = value.get("content")
        if not isinstance(value, str):
            raise DscoderError(f"{path}: field '{field}.content' must be a string")
    if value is not None and not isinstance(value, str):
        raise DscoderError(f"{path}: field '{field}' must be a string or an object with 'content', got {value!r}")
    return value


def _read_chat_template(config: Mapping[str, Any], directory: Path) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # the multi-template form: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    jinja = directory / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DscoderError(f"{jinja}: not readable ({_one_line(e)})") from None
    return None


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
