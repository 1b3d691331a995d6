"""``dscoder data recall`` on a small labelled pool written here: math pages against everyday ones, on math and
general domains. The kept pages must be the math ones (precision and recall against the true labels), keep the
inputs' ids, come out the same from a rerun and from the saved classifier, and the high-yield domains must be
found."""

from __future__ import annotations

import gzip
import json
import random

import pytest

from dscoder.cli import main
from dscoder.data.recall import RecallConfig, domain, recall

COMMON = "the of and a to is we this that it in for with as on by be are".split()
MATH = ("theorem proof lemma integral derivative equation polynomial matrix prime solve x y n = + ^ 2 \\frac sum "
        "limit function real number divisor eigenvalue vector series converges inequality").split()
OTHER = ("recipe flour oven travel hotel beach football match goal music concert guitar garden flowers weather "
         "rain movie actor city market holiday train ticket coffee shop dinner").split()
MATH_DOMAINS = ["mathforum.example.org", "algebra.example.edu"]
OTHER_DOMAINS = ["news.example.com", "food.example.net", "sports.example.com", "travel.example.org"]
FAST = dict(dim=32, lr=0.5, epoch=25, min_count=1, word_ngrams=2)  # small and quick; the defaults are DeepSeekMath's


def page(rng: random.Random, topic: list[str], words: int = 60) -> str:
    return " ".join(rng.choice(topic) if rng.random() < 0.45 else rng.choice(COMMON) for _ in range(words)) + "."


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("recall")
    rng = random.Random(0)
    seeds = write_jsonl(root / "seed.jsonl", [{"text": page(rng, MATH)} for _ in range(40)])
    rows, truth = [], {}
    for i in range(240):
        math_page = i % 4 == 0
        host = rng.choice(MATH_DOMAINS if math_page else OTHER_DOMAINS)
        doc_id = f"cc-{i:04d}"
        rows.append({"id": doc_id, "url": f"https://{host}/p/{i}", "text": page(rng, MATH if math_page else OTHER)})
        truth[doc_id] = math_page
    half = len(rows) // 2
    pools = [write_jsonl(root / "pool-a.jsonl", rows[:half]), write_jsonl(root / "pool-b.jsonl", rows[half:])]
    return root, seeds, pools, truth


def kept_of(out):
    return [json.loads(line) for line in gzip.open(out / "kept" / "00000.jsonl.gz", "rt")]


def test_recall_finds_the_math_pages_and_keeps_ids(labelled, tmp_path):
    _, seeds, pools, truth = labelled
    out = tmp_path / "r"
    manifest = recall([seeds], pools, out, RecallConfig(iterations=2, seed=3, **FAST))
    kept = kept_of(out)
    ids = [r["id"] for r in kept]
    assert set(ids) <= set(truth) and len(ids) == len(set(ids))  # the inputs' own ids, once each
    true_pos = sum(truth[i] for i in ids)
    precision, recall_rate = true_pos / len(ids), true_pos / sum(truth.values())
    assert precision >= 0.9 and recall_rate >= 0.9, (precision, recall_rate)
    assert all(r["score"] >= 0.5 and r["url"].startswith("https://") for r in kept)
    its = manifest["iterations"]
    assert [it["iteration"] for it in its] == [1, 2]
    assert all(0 <= it["heldout_recall"] <= 1 and it["heldout_precision"] is not None for it in its)
    assert its[1]["domain_positives"] > 0  # iteration 2 learned from the high-yield domains' pages
    assert sorted(manifest["high_yield_domains"]) == sorted(MATH_DOMAINS)
    assert manifest["kept"] == len(kept) and manifest["pool_documents"] == len(truth)
    assert json.loads((out / "manifest.json").read_text()) == manifest

    again = tmp_path / "again"  # deterministic: thread=1 and a seed
    recall([seeds], pools, again, RecallConfig(iterations=2, seed=3, **FAST))
    assert kept_of(again) == kept
    scored = tmp_path / "scored"  # the saved classifier scores a pool alone, as at scale
    m = recall([], pools, scored, RecallConfig(**FAST), classifier=out / "classifier.bin")
    assert [r["id"] for r in kept_of(scored)] == ids and m["kept"] == len(ids)


def test_cli_recall_and_bad_input(labelled, tmp_path, capsys):
    _, seeds, pools, truth = labelled
    out = tmp_path / "cli"
    assert main(["data", "recall", "--seed", str(seeds), "--pool", *map(str, pools), "--out", str(out),
                 "--dim", "32", "--lr", "0.5", "--epoch", "25", "--min-count", "1", "--word-ngrams", "2"]) == 0
    assert "kept" in capsys.readouterr().out
    assert (out / "classifier.bin").is_file() and len(kept_of(out)) > 0
    assert main(["data", "recall", "--pool", str(pools[0]), "--out", str(tmp_path / "x")]) == 2
    assert "--seed" in capsys.readouterr().err
    assert main(["data", "recall", "--seed", str(seeds), "--pool", str(tmp_path / "missing.jsonl"),
                 "--out", str(tmp_path / "y")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["data", "recall", "--pool", str(pools[0]), "--classifier", str(seeds), "--out",
                 str(tmp_path / "z")]) == 2
    assert "not a fastText model" in capsys.readouterr().err
    assert main(["data", "recall", "--seed", str(seeds), "--pool", str(pools[0]), "--out", str(tmp_path / "w"),
                 "--threshold", "2"]) == 2
    assert "threshold" in capsys.readouterr().err


def test_domain_of_urls():
    assert domain("https://www.Example.org/a?b") == "example.org"
    assert domain(None) is None and domain("") is None
