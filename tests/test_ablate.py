"""``dscoder ablate``: two tiny corpora with one tokenizer, the same model, seed and token budget; the corpus whose
characters were shuffled inside each document must rank below the real one by held-out perplexity, and the table,
report and plot must be written."""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

import pytest

from dscoder.ablate import ablate
from dscoder.cli import main
from dscoder.data.shards import ShardWriter
from dscoder.errors import DscoderError
from dscoder.tokenizer import Tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TRAIN = ["json/decoder.py", "json/encoder.py", "textwrap.py", "bisect.py", "heapq.py", "colorsys.py", "shlex.py",
         "fnmatch.py", "glob.py", "calendar.py"]
HELD_OUT = ["keyword.py", "genericpath.py"]


def write_build(root: Path, texts: list[str], tok: Tokenizer) -> Path:
    tok.save(root / "tokenizer")
    with ShardWriter(root / "tokens", "00000") as writer:
        for t in texts:
            writer.add(tok.encode(t))
    return root


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablate")
    texts = [(STDLIB / f).read_text() for f in TRAIN]
    tok = Tokenizer.train(texts, vocab_size=512)
    rng = random.Random(0)
    damaged = ["".join(rng.sample(t, len(t))) for t in texts]  # same characters, no code left
    heldout = root / "heldout"
    heldout.mkdir()
    for f in HELD_OUT:
        (heldout / f).write_text((STDLIB / f).read_text())
    return write_build(root / "real", texts, tok), write_build(root / "shuffled", damaged, tok), heldout


def test_damaged_corpus_ranks_below_the_real_one(corpora, tmp_path):
    real, shuffled, heldout = corpora
    out = tmp_path / "ab"
    # lr 1e-2: after 16 steps the real corpus is clearly ahead (about 256 against 477; at the recipe's 3e-3 the
    # two are still within 5%, and after 4 steps the order can even be the other way)
    settings = dict(tokens=4000, seq_len=64, micro_batch=4, heldout=[heldout], limit=1, max_tokens=8,
                    overrides=["train.lr=1e-2"])
    table = ablate({"real": real, "shuffled": shuffled}, out, **settings)
    assert table["real"]["heldout_perplexity"] < 0.8 * table["shuffled"]["heldout_perplexity"], table
    saved = json.loads((out / "ablation.json").read_text())
    for name in ("real", "shuffled"):
        assert {"heldout_perplexity", "fim_exact_match", "humaneval_pass@1"} <= set(saved[name])
    plan = json.loads((out / "plan.json").read_text())
    assert plan["steps"] == 16 and plan["tokens"] == 4096  # the same budget for both
    steps = [json.loads(line)["step"] for line in (out / "runs" / "shuffled" / "metrics.jsonl").open()]
    assert steps[-1] == 16
    assert "real < shuffled" in (out / "report.md").read_text()
    assert (out / "ablation.png").stat().st_size > 1000
    assert ablate({"real": real, "shuffled": shuffled}, out, **settings) == saved  # resumed: nothing redone
    with pytest.raises(DscoderError, match="other settings .seq_len"):
        ablate({"real": real, "shuffled": shuffled}, out, **{**settings, "seq_len": 32})


def test_cli_bad_input(corpora, tmp_path, capsys):
    real, shuffled, heldout = corpora
    assert main(["ablate", "--corpus", f"real={real}", "--out", str(tmp_path / "o"), "--tokens", "100"]) == 2
    assert "at least two" in capsys.readouterr().err
    assert main(["ablate", "--corpus", f"a={real}", f"b={heldout}", "--out", str(tmp_path / "o"),
                 "--tokens", "100"]) == 2
    assert "not a `dscoder data build`" in capsys.readouterr().err
    other = write_build(tmp_path / "other", ["x = 1\n"], Tokenizer.train(["y = 2\n"] * 10, vocab_size=270))
    assert main(["ablate", "--corpus", f"a={real}", f"b={other}", "--out", str(tmp_path / "o"),
                 "--tokens", "100"]) == 2
    assert "another tokenizer" in capsys.readouterr().err
