"""The inference engine: greedy decoding against full-sequence argmax, batching, continuous batching, sampling,
stop conditions, FIM and chat prompts, streaming, errors and the CLI commands."""

from __future__ import annotations

import argparse
import math
import time

import pytest
import torch

import dscoder
from dscoder.engine import Engine, SamplingParams, Scheduler, Sequence
from dscoder.engine.cli import register
from dscoder.engine.sampling import Needs, RowParams, apply_count_penalties, apply_repetition_penalty, sample
from dscoder.errors import DscoderError

PROMPTS = ["def f(x):", "import os\nclass A(object):\n    def run(self", "x"]


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def engine(ckpt):
    with Engine(ckpt, max_batch_size=4, max_len=128) as e:
        yield e


def reference_greedy(model, ids, n):
    """Argmax over full-sequence logits, one token at a time, no cache."""
    seq, logprobs = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq])).logits[0, -1].float()
            seq.append(int(logits.argmax()))
            logprobs.append(float(torch.log_softmax(logits, -1)[seq[-1]]))
    return seq[len(ids):], logprobs


def test_greedy_equals_full_sequence_argmax(engine):
    for prompt in PROMPTS[:2]:
        ids = engine.encode_prompt(prompt)
        out = engine.generate(prompt, max_tokens=24, ignore_eos=True, logprobs=0)
        want, want_lp = reference_greedy(engine.model, ids, 24)
        assert out.token_ids == want and out.finish_reason == "length" and out.prompt_tokens == len(ids)
        assert max(abs(a - b) for a, b in zip(out.logprobs, want_lp)) < 1e-4
        assert out.text == engine.tokenizer.decode(want, skip_special=True) and out.text


def test_batched_different_lengths_equal_one_by_one(engine):
    batched = engine.generate(PROMPTS, max_tokens=16, ignore_eos=True)
    alone = [engine.generate(p, max_tokens=16, ignore_eos=True) for p in PROMPTS]
    assert len({len(engine.encode_prompt(p)) for p in PROMPTS}) == 3
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert all(len(r.token_ids) == 16 for r in batched)


def _run(scheduler, seqs_by_step):
    """Step ``scheduler``; before step k add the sequences of ``seqs_by_step[k]``."""
    for k in range(1000):  # bounded: a scheduler that never finishes fails the test instead of hanging it
        if not (scheduler.has_work() or k < len(seqs_by_step)):
            return
        for s in seqs_by_step[k] if k < len(seqs_by_step) else ():
            scheduler.add(s)
        scheduler.step()
    raise AssertionError("the scheduler still has work after 1000 steps")


def test_continuous_batching_join_midway_equals_alone(engine):
    model, tok = engine.model, engine.tokenizer
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    a_ids, b_ids = engine.encode_prompt(PROMPTS[1]), engine.encode_prompt(PROMPTS[0])
    sched = Scheduler(model, max_batch=2, max_len=64, sync_every=3, pad_id=tok.pad_id)
    a, b = (Sequence(ids, params, 64, tok.eos_id, tok) for ids in (a_ids, b_ids))
    _run(sched, [[a], [], [b]])  # b joins after a has decoded 1 + 3 tokens
    assert a.finished and b.finished
    alone = {}
    for name, ids in (("a", a_ids), ("b", b_ids)):
        s = Scheduler(model, max_batch=1, max_len=64, pad_id=tok.pad_id)
        seq = Sequence(ids, params, 64, tok.eos_id, tok)
        _run(s, [[seq]])
        alone[name] = seq.token_ids
    assert a.token_ids == alone["a"] and b.token_ids == alone["b"]
    assert b.token_ids == reference_greedy(model, b_ids, 20)[0]


def test_cache_compaction_keeps_results(engine):
    """A small cache forces the shared cursor to wrap: rows are compacted and decoding goes on unchanged."""
    model, tok = engine.model, engine.tokenizer
    ids = [engine.encode_prompt(p) for p in PROMPTS]
    sched = Scheduler(model, max_batch=2, max_len=48, sync_every=4, pad_id=tok.pad_id)
    seqs = [Sequence(i, SamplingParams(max_tokens=20, ignore_eos=True), 48, tok.eos_id, tok) for i in ids]
    compactions = []
    compact = sched._compact
    sched._compact = lambda: (compactions.append(sched.cursor), compact())
    _run(sched, [[seqs[1]], [], [], [seqs[0]], [], [seqs[2]]])
    assert compactions
    for seq, i in zip(seqs, ids):
        assert seq.token_ids == reference_greedy(model, i, 20)[0]


def test_stop_strings_stop_tokens_max_tokens_and_ignore_eos(engine):
    ref = engine.generate(PROMPTS[0], max_tokens=20, ignore_eos=True)
    stop = ref.text[5:8]
    cut = engine.generate(PROMPTS[0], max_tokens=20, ignore_eos=True, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == ref.text[: ref.text.find(stop)]
    stop_tok = ref.token_ids[6]
    by_id = engine.generate(PROMPTS[0], max_tokens=20, ignore_eos=True, stop_token_ids=[stop_tok])
    assert by_id.finish_reason == "stop" and by_id.token_ids == ref.token_ids[: ref.token_ids.index(stop_tok) + 1]
    short = engine.generate(PROMPTS[0], max_tokens=5, ignore_eos=True)
    assert short.token_ids == ref.token_ids[:5] and short.finish_reason == "length"
    old_eos, engine.eos_id = engine.eos_id, ref.token_ids[3]  # pretend the 4th token is eos
    try:
        stopped = engine.generate(PROMPTS[0], max_tokens=20)
        ignored = engine.generate(PROMPTS[0], max_tokens=20, ignore_eos=True)
    finally:
        engine.eos_id = old_eos
    assert stopped.token_ids == ref.token_ids[: ref.token_ids.index(ref.token_ids[3]) + 1]
    assert stopped.finish_reason == "stop" and ignored.token_ids == ref.token_ids


def test_seeds_reproducible_and_independent_of_batch(engine):
    kw = dict(max_tokens=16, temperature=1.0, ignore_eos=True)
    one = engine.generate(PROMPTS[2], seed=7, **kw).token_ids
    assert engine.generate(PROMPTS[2], seed=7, **kw).token_ids == one
    assert engine.generate(PROMPTS[2], seed=8, **kw).token_ids != one
    batch = engine.generate([PROMPTS[0], PROMPTS[2]], seed=7, **kw)
    assert batch[1].token_ids == one
    greedy = engine.generate(PROMPTS[2], max_tokens=16, ignore_eos=True).token_ids
    assert one != greedy
    assert engine.generate(PROMPTS[2], seed=3, top_k=1, **kw).token_ids == greedy
    assert engine.generate(PROMPTS[2], seed=3, top_p=1e-6, **kw).token_ids == greedy


def test_sampler_frequencies_follow_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]]).repeat(4000, 1)
    rows = RowParams.empty(4000, "cpu")
    rows.temperature.fill_(1.0)
    rows.seed.fill_(11)
    steps = torch.arange(4000)
    token, *_ = sample(logits, rows, steps, Needs(sampling=True))
    freq = torch.bincount(token, minlength=5).float() / 4000
    assert (freq - torch.softmax(logits[0], -1)).abs().max() < 0.03
    rows.top_k.fill_(2)
    token, *_ = sample(logits, rows, steps, Needs(sampling=True, filtering=True))
    assert set(token.tolist()) == {0, 1}
    rows.top_k.fill_(0)
    rows.top_p.fill_(0.7)  # the top token holds 0.64 of the mass, the first two 0.87
    token, *_ = sample(logits, rows, steps, Needs(sampling=True, filtering=True))
    assert set(token.tolist()) == {0, 1}


def test_repetition_penalty(engine):
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, torch.tensor([2.0])).tolist() == [[1.0, -4.0, 1.0]]
    plain = engine.generate(PROMPTS[0], max_tokens=24, ignore_eos=True).token_ids
    penalised = engine.generate(PROMPTS[0], max_tokens=24, ignore_eos=True, repetition_penalty=5.0).token_ids
    assert len(set(penalised)) > len(set(plain))


def reference_greedy_penalised(model, ids, n, presence, frequency):
    """Greedy over full-sequence logits with OpenAI's presence/frequency penalties on the generated tokens."""
    seq, counts = list(ids), {}
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq])).logits[0, -1].float()
            for t, c in counts.items():
                logits[t] -= presence + frequency * c
            seq.append(int(logits.argmax()))
            counts[seq[-1]] = counts.get(seq[-1], 0) + 1
    return seq[len(ids):]


def test_presence_and_frequency_penalties(engine):
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    counts = torch.tensor([[0.0, 3.0, 1.0]])
    out = apply_count_penalties(logits, counts, torch.tensor([0.5]), torch.tensor([0.25]))
    assert out.tolist() == [[2.0, -3.25, 0.25]]
    ids = engine.encode_prompt(PROMPTS[0])
    plain = engine.generate(PROMPTS[0], max_tokens=24, ignore_eos=True).token_ids
    for presence, frequency in ((1.5, 0.0), (0.0, 2.0), (-0.5, 0.5)):
        got = engine.generate(PROMPTS[0], max_tokens=24, ignore_eos=True, presence_penalty=presence,
                              frequency_penalty=frequency).token_ids
        assert got == reference_greedy_penalised(engine.model, ids, 24, presence, frequency), (presence, frequency)
    penalised = engine.generate(PROMPTS[0], max_tokens=24, ignore_eos=True, presence_penalty=2.0).token_ids
    assert len(set(penalised)) > len(set(plain))
    # a penalised row beside plain rows: each row keeps its own counts
    batched = engine.generate([PROMPTS[0], PROMPTS[1]], max_tokens=16, ignore_eos=True, frequency_penalty=2.0)
    assert batched[0].token_ids == reference_greedy_penalised(engine.model, ids, 16, 0.0, 2.0)
    with pytest.raises(DscoderError, match="presence_penalty"):
        SamplingParams(presence_penalty=3)


def test_top_logprobs(engine):
    out = engine.generate(PROMPTS[0], max_tokens=6, ignore_eos=True, logprobs=3)
    for tok, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs):
        assert len(top) == 3 and max(top, key=top.get) == tok and math.isclose(top[tok], lp)
        assert sum(math.exp(v) for v in top.values()) <= 1.0 + 1e-5


def test_fim_prompt_layout_uses_tokenizer_ids(engine):
    tok = engine.tokenizer
    prefix, suffix = "def f(x):\n    ", "\n    return y\n"
    ids = engine.fim_ids(prefix, suffix)
    assert ids == [tok.bos_id, tok.fim_begin_id, *tok.encode(prefix), tok.fim_hole_id, *tok.encode(suffix),
                   tok.fim_end_id]
    assert ids == tok.encode(tok.bos_token + tok.fim_prompt(prefix, suffix), allow_special=True)
    out = engine.infill(prefix, suffix, max_tokens=8, ignore_eos=True)
    assert out.token_ids == reference_greedy(engine.model, ids, 8)[0] and out.prompt_tokens == len(ids)


def test_chat_template_ends_without_trailing_space(engine):
    tok = engine.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    ids = engine.chat_ids(messages)
    text = tok.decode(ids)
    assert text == f"{tok.bos_token}Be brief.\n\nUser: hi\n\nAssistant:" and not text.endswith(" ")
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    out = engine.chat(messages, max_tokens=6, ignore_eos=True)
    assert out.token_ids == reference_greedy(engine.model, ids, 6)[0]


def test_stream_matches_generate(engine):
    ref = engine.generate(PROMPTS[1], max_tokens=12, ignore_eos=True)
    chunks = list(engine.stream(PROMPTS[1], max_tokens=12, ignore_eos=True))
    assert "".join(c.text for c in chunks) == ref.text
    assert [t for c in chunks for t in c.token_ids] == ref.token_ids
    assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])
    stream = engine.stream(PROMPTS[1], max_tokens=100, ignore_eos=True)
    next(stream)
    stream.close()  # cancels; the engine keeps serving
    assert engine.generate(PROMPTS[1], max_tokens=12, ignore_eos=True).token_ids == ref.token_ids


def test_callers_drive_on_their_own_thread_background_requests_on_the_loop(engine):
    """A waiting caller runs the model on its thread; background requests run where run_loop runs."""
    import threading

    ids = engine.encode_prompt(PROMPTS[0])
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    seen = []
    seq = engine.submit(ids, params, on_update=lambda *a: seen.append(threading.get_ident()))
    assert not seq.done.wait(0.2)  # nobody drives it yet
    assert engine.wait(seq).token_ids == engine.generate(PROMPTS[0], max_tokens=6, ignore_eos=True).token_ids
    assert set(seen) == {threading.get_ident()}

    stop, seen = threading.Event(), []
    loop = threading.Thread(target=engine.run_loop, args=(stop,))
    loop.start()
    try:
        deadline = time.monotonic() + 10  # until the thread has claimed the loop (bounded, not a fixed sleep)
        while not engine._loop_running and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(DscoderError, match="already running"):
            engine.run_loop(stop)
        bg = engine.submit(ids, params, on_update=lambda *a: seen.append(threading.get_ident()), background=True)
        assert bg.done.wait(30) and bg.result().token_ids == seq.result().token_ids
        assert set(seen) == {loop.ident}
    finally:
        stop.set()
        loop.join(10)
    assert not loop.is_alive()


def test_close_ends_a_generate_running_on_another_thread(ckpt):
    import threading

    errors, started, closed = [], threading.Event(), threading.Event()
    e = Engine(ckpt, max_batch_size=2, max_len=128)

    def hold(*_):  # the first update blocks the driving thread until close() has returned on the main thread
        started.set()
        closed.wait(10)

    def run():
        try:
            e.wait(e.submit(e.encode_prompt(PROMPTS[0]), SamplingParams(max_tokens=100, ignore_eos=True), hold))
        except DscoderError as err:
            errors.append(str(err))

    t = threading.Thread(target=run)
    t.start()
    assert started.wait(10)
    e.close()
    closed.set()
    t.join(10)
    assert not t.is_alive() and errors == ["the engine was closed"]
    with pytest.raises(DscoderError, match="closed"):
        e.generate("x")


def test_compiled_decode_matches_eager(ckpt, engine, capsys):
    """``compile=True``: torch.compile'd decode steps (the direct expert path) give the eager engine's tokens."""
    want = engine.generate(PROMPTS, max_tokens=10, ignore_eos=True)
    dynamo_before = torch._dynamo.config.get_config_copy()
    with Engine(ckpt, max_batch_size=4, max_len=128, compile=True) as e:
        e.warmup()  # compiles the graphs of buckets 1, 2 and 4
        got = e.generate(PROMPTS, max_tokens=10, ignore_eos=True, logprobs=0)
        assert e.generate(PROMPTS[1], max_tokens=10, ignore_eos=True).token_ids == want[1].token_ids
        # alone and greedy with a repeat in the prompt: compiled speculative verify steps (graphs from warmup)
        repeat = list(range(20, 50)) * 2 + [20, 21]
        # (a random model's greedy tokens fall into a cycle within some dozens of steps: from then on every step
        # has a draft, whatever the tokenizer that shaped the checkpoint)
        seq = e.submit(repeat, SamplingParams(max_tokens=48, ignore_eos=True))
        assert e.wait(seq).token_ids == engine.generate(repeat, max_tokens=48, ignore_eos=True).token_ids
        assert seq.spec_steps > 0
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert torch._dynamo.config.get_config_copy() == dynamo_before  # compiling left no global setting changed
    capsys.readouterr()
    assert _cli(["generate", "--model", str(ckpt), "--compile", "--max-tokens", "10", "--ignore-eos", PROMPTS[1]]) == 0
    assert capsys.readouterr().out == want[1].text + "\n"


def test_prefix_cache_reuses_prompt_blocks_with_the_same_results(ckpt, engine):
    """A prompt sharing 70 tokens with an earlier one prefills only its rest and decodes what no cache gives."""
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(3, 300, (70,), generator=g).tolist()
    a, b = shared + [5, 6, 7], shared + [8, 9]
    with Engine(ckpt, max_batch_size=4, max_len=128, prefix_cache_mb=4) as e:
        cache = e.scheduler.prefix_cache
        first = e.generate(a, max_tokens=8, ignore_eos=True, logprobs=0)
        assert cache.hit_tokens == 0 and len(cache.blocks) == 2  # blocks of 32: tokens 0-31 and 32-63
        second = e.generate([b, a], max_tokens=8, ignore_eos=True, logprobs=0)
        # b takes 64 block tokens + the 6 it shares with a's tail; b's tail then replaces a's (the latest tail after
        # a block is kept), so a takes 64 + 6 as well
        assert cache.hit_tokens == 140
    for got, prompt in ((first, a), (second[0], b), (second[1], a)):
        want, want_lp = reference_greedy(engine.model, prompt, 8)
        assert got.token_ids == want
        assert max(abs(x - y) for x, y in zip(got.logprobs, want_lp)) < 1e-4


def test_chunked_prefill_same_tokens_and_running_streams_go_on(ckpt, engine):
    """prefill_chunk: a long prompt prefilled 8 tokens per step gives the unchunked tokens, and a stream already
    running keeps receiving tokens meanwhile (it is not stalled until the long prompt is done)."""
    g = torch.Generator().manual_seed(5)
    long_prompt = torch.randint(3, 300, (90,), generator=g).tolist()
    events = []
    with Engine(ckpt, max_batch_size=4, max_len=128, prefill_chunk=8, prefix_cache_mb=4) as e:
        short = e.submit(e.encode_prompt(PROMPTS[0]), SamplingParams(max_tokens=30, ignore_eos=True, stream=True),
                         on_update=lambda s, text, new, done: events.append(("short", len(new))))
        long = e.submit(long_prompt, SamplingParams(max_tokens=6, ignore_eos=True, logprobs=0),
                        on_update=lambda s, text, new, done: events.append(("long", len(new))))
        got_short, got_long = e.wait([short, long])
        assert e.scheduler.job is None
    want, want_lp = reference_greedy(engine.model, long_prompt, 6)
    assert got_long.token_ids == want and max(abs(a - b) for a, b in zip(got_long.logprobs, want_lp)) < 1e-4
    assert got_short.token_ids == reference_greedy(engine.model, engine.encode_prompt(PROMPTS[0]), 30)[0]
    first_long = next(i for i, ev in enumerate(events) if ev[0] == "long")
    # 90 tokens in chunks of 8: 12 steps, each with a decode step of the stream
    assert sum(n for who, n in events[:first_long] if who == "short") >= 10


def test_prefix_cache_stays_within_its_budget():
    from dscoder.engine.batch import PrefixCache

    cache = PrefixCache(max_bytes=3 * 2 * 4 * 5 * 4, block=4)  # room for 3 blocks of [2 layers, 4 tokens, 5] fp32
    entries = torch.randn(2, 20, 5)
    cache.store(list(range(20)), entries)  # 5 full blocks: the first 2 are dropped
    assert len(cache.blocks) == 3 and cache.nbytes <= cache.max_bytes
    assert cache.lookup(list(range(20))) == (0, None)  # block 0 is gone, so no prefix matches
    cache.store(list(range(9)), entries[:, :9])
    m, got = cache.lookup(list(range(9)))
    assert m == 8 and torch.equal(got, entries[:, :8])
    with pytest.raises(DscoderError, match="prefix_cache_mb"):
        Engine("tiny", prefix_cache_mb=-1)


def test_engine_construction_leaves_dynamo_config_alone(ckpt):
    """Only compiled decode steps raise dynamo's recompile limit (to a graph per bucket), and only while they run."""
    import torch._dynamo.config as dynamo_config

    before = dynamo_config.get_config_copy()
    for compile in (False, True):
        with Engine(ckpt, max_batch_size=64, max_len=64, compile=compile):
            assert dynamo_config.get_config_copy() == before
    model = dscoder.load_model(ckpt)
    seen = []

    def decode(*args, **kwargs):
        seen.append(dynamo_config.recompile_limit)
        return model(*args, **kwargs)

    scheduler = Scheduler(model, max_batch=64, max_len=64, decode_fn=decode)
    assert scheduler.buckets == [1, 2, 4, 8, 16, 32, 64]
    seq = Sequence([3, 4, 5], SamplingParams(max_tokens=3, ignore_eos=True), 64, None)
    _run(scheduler, [[seq]])
    assert seq.token_ids and seen and set(seen) == {len(scheduler.buckets) + 2} != {before["recompile_limit"]}
    assert dynamo_config.get_config_copy() == before


def test_engine_honours_device(ckpt, capsys):
    """The model and the cache go where ``device`` says; a device that cannot be used is one clear line."""
    model = dscoder.load_model(ckpt)
    with Engine(model, device="cpu", max_len=64) as e:
        assert e.model is model and e.scheduler.cache.kv.device.type == "cpu"
    meta = dscoder.build_model(model.config, device="meta")
    with pytest.raises(DscoderError, match="the model is on the meta device"):
        Engine(meta, device="cpu")
    with pytest.raises(DscoderError, match="not a device name"):
        Engine(model, device="gpu0")
    with pytest.raises(DscoderError, match="device 'meta': an engine needs a device that holds weights"):
        Engine(ckpt, device="meta")
    if not torch.cuda.is_available():  # the device is read, not ignored: a CPU-only machine refuses cuda
        with pytest.raises(DscoderError, match="CUDA is not available"):
            Engine(model, device="cuda")
    assert _cli(["generate", "--model", str(ckpt), "--device", "gpu0", "x"]) == 2
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "not a device name" in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_engine_moves_a_cpu_model_to_cuda(ckpt, engine):
    want = engine.generate(PROMPTS, max_tokens=6, ignore_eos=True)
    model = dscoder.load_model(ckpt)
    with Engine(model, device="cuda", max_batch_size=4, max_len=128) as e:
        assert next(model.parameters()).device.type == "cuda" and e.scheduler.cache.kv.device.type == "cuda"
        got = e.generate(PROMPTS, max_tokens=6, ignore_eos=True)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]


def test_bfloat16_engine(ckpt):
    with Engine(ckpt, dtype="bfloat16", max_len=64) as e:
        assert e.model.lm_head.weight.dtype == torch.bfloat16
        out = e.generate(PROMPTS, max_tokens=8, ignore_eos=True)
        assert [len(r.token_ids) for r in out] == [8, 8, 8]


def test_clear_errors(engine, tmp_path):
    with pytest.raises(DscoderError, match="no such checkpoint"):
        Engine(tmp_path / "missing")
    with pytest.raises(DscoderError, match="the prompt has 200 tokens; the context holds 128"):
        engine.generate([5] * 200)
    with pytest.raises(DscoderError, match="temperature"):
        engine.generate("x", temperature=-1)
    with pytest.raises(DscoderError, match="top_p"):
        engine.generate("x", top_p=0)
    with pytest.raises(DscoderError, match="unknown sampling option"):
        engine.generate("x", temprature=1)
    with pytest.raises(DscoderError, match="unknown role"):
        engine.chat([{"role": "robot", "content": "x"}])


def _cli(argv):
    """What dscoder.cli.main does with these commands once ``register`` is wired in."""
    parser = argparse.ArgumentParser(prog="dscoder")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DscoderError as e:
        print(f"dscoder: error: {e}")
        return 2


def test_cli_generate_infill_chat(ckpt, engine, capsys, monkeypatch):
    ref = engine.generate(PROMPTS[0], max_tokens=10, ignore_eos=True)
    assert _cli(["generate", "--model", str(ckpt), "--max-tokens", "10", "--ignore-eos", PROMPTS[0]]) == 0
    assert capsys.readouterr().out == ref.text + "\n"
    fim = engine.infill("a = ", "\nb", max_tokens=5, ignore_eos=True)
    assert _cli(["infill", "--model", str(ckpt), "--prefix", "a = ", "--suffix", "\nb", "--max-tokens", "5",
                 "--ignore-eos"]) == 0
    assert capsys.readouterr().out == fim.text + "\n"
    answers = iter(["hi", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    chat = engine.chat([{"role": "user", "content": "hi"}], max_tokens=5, ignore_eos=True)
    assert _cli(["chat", "--model", str(ckpt), "--max-tokens", "5", "--ignore-eos"]) == 0
    assert capsys.readouterr().out == f"Assistant: {chat.text}\n"


def test_cli_errors_are_one_line(tmp_path, ckpt, capsys):
    assert _cli(["generate", "--model", str(tmp_path / "nope"), "x"]) == 2
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no such checkpoint" in out
    assert _cli(["generate", "--model", str(ckpt), "--temperature", "-2", "x"]) == 2
    assert "temperature" in capsys.readouterr().out
