"""PackedLoader: stream contents and order, FIM round trip, rank sharding, mixture, exact resume, argument errors."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dscoder.data.fim import document_tokens, undo_fim
from dscoder.data.loader import PackedLoader
from dscoder.data.shards import ShardWriter, TokenDataset
from dscoder.errors import DscoderError
from dscoder.tokenizer import Tokenizer

WORDS = ["alpha", "beta", "gamma", "delta", "kernel", "vector", "matrix", "queue", "stack", "token", "é", "naïve"]
CODE = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" + "    # pass\n" * (i % 5) for i in range(40)]
MATH = [f"{i} + {i + 3} = {2 * i + 3}, so x = {i}." for i in range(15)]
TEXT = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + i % 9)) + f" ({i})." for i in range(25)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(CODE + MATH + TEXT + WORDS * 5, vocab_size=400)


def _write_build(root, texts_or_ids, tok=None, n_shards=2):
    """A build dir with tokens/ split over ``n_shards`` shards; returns the documents' ids in build order."""
    docs = [tok.encode(t) if isinstance(t, str) else list(t) for t in texts_or_ids]
    per_shard = math.ceil(len(docs) / n_shards) if docs else 0
    for s in range(n_shards):
        with ShardWriter(root / "tokens", f"shard{s:02d}") as writer:
            for ids in docs[s * per_shard: (s + 1) * per_shard]:
                writer.add(ids)
    return docs


@pytest.fixture(scope="module")
def builds(tmp_path_factory, tok):
    """name -> (path, texts, ids) for three small builds."""
    out = {}
    for name, texts in (("code", CODE), ("math", MATH), ("text", TEXT)):
        root = tmp_path_factory.mktemp(name)
        out[name] = (root, texts, _write_build(root, texts, tok))
    return out


def _batches(loader, n):
    return [next(loader) for _ in range(n)]


def _as_stream(batches):
    """Stream tokens covered by consecutive batches. Checks that labels are inputs shifted by one and that each row
    starts with the previous row's last label (windows of seq_len + 1 that start every seq_len tokens)."""
    inputs = np.concatenate([b["input_ids"].numpy() for b in batches])
    labels = np.concatenate([b["labels"].numpy() for b in batches])
    assert inputs.dtype == labels.dtype == np.int64
    np.testing.assert_array_equal(inputs[:, 1:], labels[:, :-1])
    np.testing.assert_array_equal(inputs[1:, 0], labels[:-1, -1])
    return np.concatenate([inputs[:1, 0], labels.reshape(-1)])


def _segments(stream, eos):
    """Complete documents (each ending in eos) of a stream; the unfinished tail is dropped."""
    ends = np.flatnonzero(stream == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [stream[s: e + 1].tolist() for s, e in zip(starts, ends)]


def _stream_until(loader, eos, n_docs):
    batches = []
    while True:
        batches.append(next(loader))
        stream = _as_stream(batches)
        if np.count_nonzero(stream == eos) >= n_docs:
            return stream


def test_batch_shapes_and_types(builds, tok):
    loader = PackedLoader(builds["code"][0], tok, seq_len=12, batch_size=3, fim_rate=0.0)
    batch = next(iter(loader))
    assert set(batch) == {"input_ids", "labels"}
    for t in batch.values():
        assert t.shape == (3, 12) and t.dtype == torch.int64
    # labels own their memory: masking them in place leaves the inputs alone
    before = batch["input_ids"].clone()
    batch["labels"].fill_(-100)
    assert (batch["input_ids"] == before).all()
    assert loader.rows == 3


def test_no_fim_stream_is_documents_plus_eos_in_permutation_order(builds, tok):
    path, texts, ids = builds["code"]
    loader = PackedLoader(path, tok, seq_len=16, batch_size=4, seed=3, fim_rate=0.0)
    orders = [loader.documents(0, epoch) for epoch in range(3)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(len(ids)))
    assert orders[0].tolist() != list(range(len(ids))) and orders[0].tolist() != orders[1].tolist()

    expected = []
    for epoch, order in enumerate(orders):
        for i in order:
            # the fast path (stored ids + eos) must be exactly what document_tokens gives without FIM
            slow = document_tokens(tok.decode(ids[i]), np.random.default_rng(epoch), tok, fim_rate=0.0)
            assert slow == ids[i] + [tok.eos_id]
            expected += slow
    n_batches = (sum(len(ids[i]) + 1 for i in orders[0]) * 2) // (16 * 4) + 1  # past the end of epoch 1
    stream = _as_stream(_batches(loader, n_batches))
    assert len(stream) == n_batches * 16 * 4 + 1
    np.testing.assert_array_equal(stream, expected[: len(stream)])


def test_fim_documents_recoverable_with_undo_fim(builds, tok):
    path, texts, ids = builds["code"]
    loader = PackedLoader(path, tok, seq_len=16, batch_size=4, seed=1, fim_rate=0.5, spm_rate=0.5)
    order = loader.documents(0, 0)
    segments = _segments(_stream_until(loader, tok.eos_id, len(order)), tok.eos_id)[: len(order)]
    fim_ids = {tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id}
    n_fim = 0
    for i, segment in zip(order, segments):
        assert undo_fim(segment, tok) == texts[i]
        if fim_ids & set(segment):
            n_fim += 1
        else:
            assert segment == ids[i] + [tok.eos_id]
    assert 8 <= n_fim <= 32  # about half of 40; P(outside) < 1e-4


def test_fim_rate_one_transforms_every_document(builds, tok):
    path, texts, ids = builds["math"]
    loader = PackedLoader(path, tok, seq_len=8, batch_size=2, fim_rate=1.0)
    order = loader.documents(0, 0)
    segments = _segments(_stream_until(loader, tok.eos_id, len(order)), tok.eos_id)[: len(order)]
    for i, segment in zip(order, segments):
        assert segment[0] == tok.fim_begin_id
        assert undo_fim(segment, tok) == texts[i]


def test_fim_split_depends_on_document_and_epoch_not_on_ranks(builds, tok):
    path, texts, ids = builds["math"]

    def fim_by_text(loader, epochs):
        """{(epoch, text): ids} for the documents this loader visits in ``epochs`` epochs."""
        orders = [loader.documents(0, e) for e in range(epochs)]
        n = sum(len(o) for o in orders)
        segments = _segments(_stream_until(loader, tok.eos_id, n), tok.eos_id)[:n]
        keys = [(e, texts[i]) for e, order in enumerate(orders) for i in order]
        for (_, text), segment in zip(keys, segments):
            assert undo_fim(segment, tok) == text
        return dict(zip(keys, segments))

    single = fim_by_text(PackedLoader(path, tok, 8, 2, seed=6, fim_rate=1.0), 2)
    changed = sum(single[0, t] != single[1, t] for t in texts)
    assert changed >= len(texts) // 2  # a new split each epoch
    for rank in range(2):
        split = fim_by_text(PackedLoader(path, tok, 8, 2, rank=rank, world_size=2, seed=6, fim_rate=1.0), 1)
        for key, segment in split.items():
            assert segment == single[key]


def test_no_fim_needs_only_the_eos_id(builds):
    """The fast path never decodes, so a tokenizer without FIM tokens serves fim_rate=0 (and is refused above it)."""
    bare = SimpleNamespace(eos_id=99999, fim_begin_id=None, fim_hole_id=None, fim_end_id=None)
    batch = next(PackedLoader(builds["code"][0], bare, 64, 1, fim_rate=0.0))
    assert 99999 in batch["labels"]
    with pytest.raises(DscoderError, match="fim_rate"):
        PackedLoader(builds["code"][0], bare, 64, 1, fim_rate=0.5)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_read_disjoint_documents_that_cover_an_epoch(builds, tok, world_size):
    path, texts, ids = builds["code"]
    index_of = {tuple(d) + (tok.eos_id,): i for i, d in enumerate(ids)}
    seen = []
    for rank in range(world_size):
        loader = PackedLoader(path, tok, seq_len=8, batch_size=2, rank=rank, world_size=world_size, seed=5,
                              fim_rate=0.0)
        n_mine = len(loader.documents(0, 0))
        assert n_mine in (len(ids) // world_size, len(ids) // world_size + 1)
        segments = _segments(_stream_until(loader, tok.eos_id, n_mine), tok.eos_id)[:n_mine]
        mine = [index_of[tuple(s)] for s in segments]
        assert mine == loader.documents(0, 0).tolist()
        assert len(set(mine)) == n_mine
        seen.append(set(mine))
    assert sum(len(s) for s in seen) == len(ids)
    assert set().union(*seen) == set(range(len(ids)))


def test_a_rank_computes_its_slice_alone(builds, tok):
    """Rank 1's stream is the same whether or not rank 0's loader was made or consumed first."""
    path = builds["code"][0]
    kwargs = dict(rank=1, world_size=2, seed=2, fim_rate=0.5)
    alone = _batches(PackedLoader(path, tok, 8, 2, **kwargs), 5)
    other = PackedLoader(path, tok, 8, 2, rank=0, world_size=2, seed=2, fim_rate=0.5)
    _batches(other, 7)
    after = _batches(PackedLoader(path, tok, 8, 2, **kwargs), 5)
    for a, b in zip(alone, after):
        assert (a["input_ids"] == b["input_ids"]).all()


def test_mixture_token_shares_follow_normalised_weights(builds, tok):
    """Weights are token shares (the paper's 60/10/30), whatever the sources' document lengths: the loader's label
    counts per source are exact (checked against the stream) and within a percent of the weights."""
    source_of = {}
    for s, name in enumerate(("code", "math", "text")):
        for d in builds[name][2]:
            source_of[tuple(d) + (tok.eos_id,)] = s
    weights = (6.0, 1.0, 3.0)
    sources = [(builds[name][0], w) for name, w in zip(("code", "math", "text"), weights)]
    loader = PackedLoader(sources, tok, seq_len=256, batch_size=8, seed=11, fim_rate=0.0)
    stream = _as_stream(_batches(loader, 12))
    shares = loader.token_shares()
    for share, w in zip(shares, weights):
        assert abs(share - w / sum(weights)) < 0.01, (shares, weights)
    # the loader's counts are the stream's: each stream token but the first is a label of the source it came from
    segments = _segments(stream, tok.eos_id)
    counted = [0, 0, 0]
    for seg in segments:
        counted[source_of[tuple(seg)]] += len(seg)
    counted[loader._doc_ref[0]] += len(stream) - sum(map(len, segments))  # the unfinished document
    counted[source_of[tuple(segments[0])]] -= 1
    assert counted == loader.label_tokens and sum(counted) == 12 * 8 * 256


def test_same_seed_same_batches_other_seed_other_batches(builds, tok):
    sources = [(builds["code"][0], 0.6), (builds["math"][0], 0.1), (builds["text"][0], 0.3)]

    def first(seed):
        return _as_stream(_batches(PackedLoader(sources, tok, 16, 2, seed=seed, fim_rate=0.5, spm_rate=0.5), 6))

    a, b, c = first(7), first(7), first(8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("rank", [0, 1])
def test_resume_is_exact(builds, tok, rank):
    sources = [(builds["code"][0], 0.6), (builds["math"][0], 0.1), (builds["text"][0], 0.3)]

    def make():
        return PackedLoader(sources, tok, seq_len=16, batch_size=2, rank=rank, world_size=2, seed=4,
                            fim_rate=0.5, spm_rate=0.5)

    n = 70
    uninterrupted = make()
    reference = _batches(uninterrupted, n)
    code_epochs = []
    for k in (0, 1, 9, 33, 64):
        loader = make()
        _batches(loader, k)
        state = loader.state_dict()
        text = json.dumps(state)
        assert len(text) < 600, text
        assert state["rows"] == 2 * k
        code_epochs.append(state["sources"][0]["epoch"])
        restored = make()
        restored.load_state_dict(json.loads(text))
        for j, batch in enumerate(_batches(restored, n - k)):
            for key in ("input_ids", "labels"):
                assert (batch[key] == reference[k + j][key]).all(), (k, j, key)
        assert restored.state_dict() == uninterrupted.state_dict()
    assert max(code_epochs) >= 2  # the resume points cross source epochs


def test_resume_with_another_batch_shape_continues_the_stream(builds, tok):
    path = builds["text"][0]
    first = PackedLoader(path, tok, seq_len=10, batch_size=3, seed=9, fim_rate=0.5)
    whole = _as_stream(_batches(first, 8))  # 8 * 30 tokens + 1
    head = PackedLoader(path, tok, seq_len=10, batch_size=3, seed=9, fim_rate=0.5)
    _batches(head, 3)
    tail = PackedLoader(path, tok, seq_len=7, batch_size=2, seed=9, fim_rate=0.5)
    tail.load_state_dict(head.state_dict())
    rest = _as_stream(_batches(tail, 10))  # 140 tokens + 1, from stream position 90
    np.testing.assert_array_equal(rest, whole[90: 90 + 141])


def _rows(batches):
    return [tuple(row) for b in batches for row in torch.cat([b["input_ids"], b["labels"][:, -1:]], 1).tolist()]


def test_shuffled_rows_are_the_stream_rows_in_another_order(builds, tok):
    """Each block of shuffle_rows rows holds exactly the rows the unshuffled loader gives, in another order, and a
    batch's rows come from scattered stream positions."""
    sources = [(builds["code"][0], 0.6), (builds["text"][0], 0.4)]
    plain = PackedLoader(sources, tok, seq_len=8, batch_size=2, seed=3, fim_rate=0.5)
    shuffled = PackedLoader(sources, tok, seq_len=8, batch_size=2, seed=3, fim_rate=0.5, shuffle_rows=11)
    assert shuffled.shuffle_rows == 12  # rounded up to whole batches
    for _ in range(3):  # three blocks of 6 batches
        want, got = _rows(_batches(plain, 6)), _rows(_batches(shuffled, 6))
        assert sorted(got) == sorted(want) and got != want
    assert shuffled.label_tokens == plain.label_tokens
    other = PackedLoader(sources, tok, seq_len=8, batch_size=2, seed=4, fim_rate=0.5, shuffle_rows=12)
    assert _rows(_batches(other, 6)) != _rows(_batches(PackedLoader(sources, tok, seq_len=8, batch_size=2, seed=3,
                                                                    fim_rate=0.5, shuffle_rows=12), 6))


def test_shuffled_loader_resumes_exactly(builds, tok):
    def make(**kw):
        return PackedLoader(builds["code"][0], tok, seq_len=8, batch_size=2, seed=5, fim_rate=0.5, **kw)

    n = 20
    uninterrupted = make(shuffle_rows=8)
    reference = _batches(uninterrupted, n)
    for k in (0, 1, 3, 4, 9):  # before the first block, inside blocks and at a block's end
        loader = make(shuffle_rows=8)
        _batches(loader, k)
        state = json.loads(json.dumps(loader.state_dict()))
        restored = make(shuffle_rows=8)
        restored.load_state_dict(state)
        for j, batch in enumerate(_batches(restored, n - k)):
            assert (batch["input_ids"] == reference[k + j]["input_ids"]).all(), (k, j)
            assert (batch["labels"] == reference[k + j]["labels"]).all(), (k, j)
        assert restored.state_dict() == uninterrupted.state_dict()
    with pytest.raises(DscoderError, match="shuffle_rows"):
        make().load_state_dict(state)
    # a new row length (the next long-context stage) continues after every packed row
    loader = make(shuffle_rows=8)
    _batches(loader, 1)
    plain = make()
    _batches(plain, 4)
    assert loader.stream_state() == plain.state_dict()


def test_state_from_another_setup_is_refused(builds, tok):
    path = builds["code"][0]
    state = PackedLoader(path, tok, 8, 2, rank=0, world_size=2).state_dict()
    with pytest.raises(DscoderError, match="world_size"):
        PackedLoader(path, tok, 8, 2, rank=0, world_size=1).load_state_dict(state)
    with pytest.raises(DscoderError, match="seed"):
        PackedLoader(path, tok, 8, 2, rank=0, world_size=2, seed=1).load_state_dict(state)
    with pytest.raises(DscoderError, match="sources"):
        PackedLoader([(path, 1.0), (builds["math"][0], 1.0)], tok, 8, 2, world_size=2).load_state_dict(state)
    with pytest.raises(DscoderError, match="malformed"):
        PackedLoader(path, tok, 8, 2, world_size=2).load_state_dict({"version": 1})


def _bad_cases(builds, tmp_path):
    code = builds["code"][0]
    empty = tmp_path / "empty"
    _write_build(empty, [], n_shards=1)
    tiny = tmp_path / "tiny"
    _write_build(tiny, [[1, 2], [3]], n_shards=1)
    (tmp_path / "bare").mkdir()
    return [
        (dict(seq_len=0), "seq_len"),
        (dict(seq_len=2.5), "seq_len"),
        (dict(batch_size=-1), "batch_size"),
        (dict(rank=2, world_size=2), "rank"),
        (dict(rank=-1), "rank"),
        (dict(world_size=0), "world_size"),
        (dict(seed=-3), "seed"),
        (dict(fim_rate=1.5), "fim_rate"),
        (dict(spm_rate=-0.1), "spm_rate"),
        (dict(sources=[(code, 0.0)]), "weight"),
        (dict(sources=[(code, 1.0), (code, -2)]), "sources[1] weight"),
        (dict(sources=[(code, float("nan"))]), "weight"),
        (dict(sources=[]), "sources"),
        (dict(sources=[code]), "sources[0]"),
        (dict(sources=tmp_path / "missing"), "missing"),
        (dict(sources=tmp_path / "bare"), "bare"),
        (dict(sources=[(code, 1.0), (empty, 1.0)]), "sources[1]"),
        (dict(sources=tiny, world_size=3), "world_size"),
    ]


def test_bad_arguments_give_one_line_errors(builds, tok, tmp_path):
    for overrides, needle in _bad_cases(builds, tmp_path):
        kwargs = dict(sources=builds["code"][0], seq_len=8, batch_size=2)
        kwargs.update(overrides)
        sources, seq_len, batch_size = kwargs.pop("sources"), kwargs.pop("seq_len"), kwargs.pop("batch_size")
        with pytest.raises(DscoderError) as info:
            PackedLoader(sources, tok, seq_len, batch_size, **kwargs)
        message = str(info.value)
        assert "\n" not in message and needle in message, (overrides, message)


def test_min_tokens_keeps_only_long_documents(builds, tok):
    path, _, ids = builds["code"]
    threshold = sorted(len(d) for d in ids)[len(ids) // 2]
    long_docs = sorted(d + [tok.eos_id] for d in ids if len(d) >= threshold)
    loader = PackedLoader([(path, 1.0, threshold)], tok, seq_len=16, batch_size=4, fim_rate=0.0)
    seen = _segments(_as_stream(_batches(loader, 40)), tok.eos_id)
    assert seen and all(len(s) >= threshold + 1 for s in seen)
    assert sorted(seen[: len(long_docs)]) == long_docs  # the first epoch is exactly the long documents
    with pytest.raises(DscoderError, match="holds no documents of 100000 tokens or more"):
        PackedLoader([(path, 1.0, 100_000)], tok, seq_len=16, batch_size=4, fim_rate=0.0)


def test_shard_writer_leaves_nothing_when_the_writer_fails(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "tokens", "s") as writer:
        writer.add([1, 2, 3])
        raise RuntimeError("tokenizer crashed")
    assert list((tmp_path / "tokens").iterdir()) == []
    with ShardWriter(tmp_path / "tokens", "s") as writer:
        writer.add([1, 2, 3])
    assert sorted(p.name for p in (tmp_path / "tokens").iterdir()) == ["s.bin", "s.idx.npy"]
    assert TokenDataset(tmp_path)[0].tolist() == [1, 2, 3]
