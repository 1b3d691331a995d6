"""Speed where editors feel it: prompt-lookup speculative decoding (greedy tokens identical with and without it) and
prompt-cache reuse across requests (a repeated, extended or end-edited prompt prefills only what changed)."""

from __future__ import annotations

import pytest
import torch

from dscoder.engine import Engine, SamplingParams
from dscoder.engine.speculative import PromptLookup
from dscoder.errors import DscoderError

EDIT_PROMPT = ("def f3(x):\n    return x * 3 + alpha\n\ndef f4(x):\n    return x * 4 + beta\n\n"
               "# the same two functions, unchanged:\ndef f3(x):\n    return x")


@pytest.fixture(scope="module")
def plain(tiny_checkpoint):
    with Engine(tiny_checkpoint, max_batch_size=4, max_len=256, speculative=False) as e:
        yield e


@pytest.fixture(scope="module")
def spec(tiny_checkpoint):
    with Engine(tiny_checkpoint, max_batch_size=4, max_len=256) as e:  # speculative by default
        assert e.scheduler.spec_tokens > 0
        yield e


def _prompts(engine) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    body = torch.randint(3, 300, (60,), generator=g).tolist()
    return [engine.encode_prompt(EDIT_PROMPT),                 # an edit: the output may repeat prompt text
            body + [7, 8] + body[:12],                         # a repeat already under way in the prompt
            engine.encode_prompt("import os\nclass A(object):\n    def run(self"),
            torch.randint(3, 300, (40,), generator=g).tolist()]


def _run(engine, prompts, **kw):
    seqs = [engine.submit(p, SamplingParams(**kw)) for p in prompts]
    return engine.wait(seqs), seqs


def test_prompt_lookup_drafts_what_followed_the_latest_match():
    lookup = PromptLookup(max_ngram=3, min_ngram=2)
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 4, 6, 7, 0, 3, 4]
    assert lookup.draft(tokens, 3) == [6, 7, 0]  # (3, 4) last seen before 6; the 3-gram (0, 3, 4) is new
    assert lookup.draft(tokens + [6], 2) == [7, 0]  # (3, 4, 6) seen: what followed it
    assert PromptLookup().draft([5, 6, 7, 8], 4) == []  # no repeated n-gram: no draft (one index per sequence)
    assert PromptLookup().draft([1, 1, 1, 1], 4) == [1]  # the continuation is cut where the tokens end


def test_greedy_tokens_identical_with_and_without_speculation(plain, spec):
    prompts = _prompts(plain)
    accepted = 0
    for p in prompts:  # one at a time: batch-1 greedy is where speculation runs
        (want,), _ = _run(plain, [p], max_tokens=48, ignore_eos=True, logprobs=2)
        (got,), (seq,) = _run(spec, [p], max_tokens=48, ignore_eos=True, logprobs=2)
        assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
        assert max(abs(a - b) for a, b in zip(got.logprobs, want.logprobs)) < 1e-4
        assert [set(t) for t in got.top_logprobs] == [set(t) for t in want.top_logprobs]
        assert got.text == want.text
        assert seq.spec_steps > 0
        accepted += seq.spec_accepted
    assert accepted > 0  # some drafts were right, so some steps yielded several tokens


def test_batched_rows_decode_plainly_then_the_last_one_speculates(plain, spec):
    """Two greedy rows and a sampled one decode together (no speculation while several rows run); once the short
    ones finish, the long greedy row speculates alone. Every row's tokens equal the unspeculated engine's."""
    prompts = _prompts(plain)
    kinds = [dict(max_tokens=40), dict(max_tokens=6), dict(max_tokens=10, temperature=0.9, seed=5)]
    want = [plain.generate(p, ignore_eos=True, **k) for p, k in zip(prompts, kinds)]
    seqs = [spec.submit(p, SamplingParams(ignore_eos=True, **k)) for p, k in zip(prompts, kinds)]
    got = spec.wait(seqs)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert seqs[0].spec_steps > 0 and seqs[1].spec_steps == 0 and seqs[2].spec_steps == 0


def test_stops_lengths_and_streams_with_speculation(plain, spec):
    p = _prompts(plain)[1]
    ref = plain.generate(p, max_tokens=30, ignore_eos=True)
    for kw in (dict(stop_token_ids=[ref.token_ids[9]]), dict(stop=[ref.text[6:9]]), dict(max_tokens=7),
               dict(max_tokens=1), dict(repetition_penalty=1.3)):
        args = dict(max_tokens=30, ignore_eos=True) | kw
        want, got = plain.generate(p, **args), spec.generate(p, **args)
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason), kw
    chunks = list(spec.stream(p, max_tokens=30, ignore_eos=True))
    assert [t for c in chunks for t in c.token_ids] == ref.token_ids
    assert "".join(c.text for c in chunks) == ref.text and chunks[-1].finish_reason == "length"


def test_speculation_can_be_turned_off_and_is_checked(tiny_checkpoint, plain):
    assert plain.scheduler.spec_tokens == 0
    (_,), (seq,) = _run(plain, [_prompts(plain)[1]], max_tokens=20, ignore_eos=True)
    assert seq.spec_steps == 0
    with pytest.raises(DscoderError, match="speculative"):
        Engine(tiny_checkpoint, speculative="yes")


# ----- prompt-cache reuse ------------------------------------------------------------------------------------------
class _Counting:
    """Wraps the scheduler's prefill model and counts the prompt tokens it runs."""

    def __init__(self, model):
        self.model, self.tokens = model, 0

    def __call__(self, ids, **kw):
        self.tokens += ids.numel()
        return self.model(ids, **kw)

    def __getattr__(self, name):
        return getattr(self.model, name)


def test_extended_and_repeated_prompts_prefill_only_new_tokens(tiny_checkpoint, plain):
    g = torch.Generator().manual_seed(7)
    base = torch.randint(3, 300, (70,), generator=g).tolist()
    extended = base + torch.randint(3, 300, (10,), generator=g).tolist()
    with Engine(tiny_checkpoint, max_batch_size=2, max_len=256, prefix_cache_mb=8) as e:
        counter = e.scheduler.model = _Counting(e.scheduler.model)
        first = e.generate(base, max_tokens=6, ignore_eos=True)
        assert counter.tokens == 70 and first.cached_tokens == 0
        counter.tokens = 0
        seqs = [e.submit(extended, SamplingParams(max_tokens=12, ignore_eos=True, logprobs=0))]
        (got,) = e.wait(seqs)
        assert counter.tokens == 10 and got.cached_tokens == seqs[0].cached_tokens == 70  # 2 blocks + the tail
        counter.tokens = 0
        again = e.generate(extended, max_tokens=12, ignore_eos=True, logprobs=0)
        assert counter.tokens == 1 and again.cached_tokens == 79  # one token is always prefilled (for the logits)
        # the previous answer appended (a plain-completion client continuing): only the answer's tokens prefill
        counter.tokens = 0
        cont = e.generate(extended + got.token_ids, max_tokens=4, ignore_eos=True)
        assert counter.tokens == len(got.token_ids) and cont.cached_tokens == 80
    cold = plain.generate(extended, max_tokens=12, ignore_eos=True, logprobs=0)
    for r in (got, again):
        assert r.token_ids == cold.token_ids
        assert max(abs(a - b) for a, b in zip(r.logprobs, cold.logprobs)) < 1e-4
    assert cont.token_ids == plain.generate(extended + got.token_ids, max_tokens=4, ignore_eos=True).token_ids


def test_fim_reuse_survives_edits_at_the_end_of_the_prefix(tiny_checkpoint, plain):
    """`<fim_begin>prefix<fim_hole>suffix<fim_end>`: typing at the end of the prefix keeps every cached token before
    the edit (to the token, not just whole blocks); the suffix comes after the edit, so it is prefilled again.
    An edit in the suffix keeps the whole prefix."""
    prefix = "".join(f"def f{i}(x):\n    return x * {i} + beta\n" for i in range(6)) + "def g(x):\n    return x"
    suffix = "\n\ndef h(y):\n    return y * 2 + alpha\n"
    with Engine(tiny_checkpoint, max_batch_size=2, max_len=512, prefix_cache_mb=8) as e:
        e.scheduler.model = counter = _Counting(e.scheduler.model)
        sent = [e.fim_ids(prefix, suffix)]
        assert e.infill(prefix, suffix, max_tokens=4).cached_tokens == 0
        for new_prefix, new_suffix in ((prefix + " * 7", suffix), (prefix + " *", suffix),
                                       (prefix + " * 7", suffix + "x = 1\n")):
            new = e.fim_ids(new_prefix, new_suffix)
            common = max(next(i for i, (a, b) in enumerate(zip(old, new)) if a != b) for old in sent)
            counter.tokens = 0
            got = e.infill(new_prefix, new_suffix, max_tokens=4, ignore_eos=True)
            assert got.cached_tokens == common and counter.tokens == len(new) - common
            assert got.token_ids == plain.generate(new, max_tokens=4, ignore_eos=True).token_ids
            sent.append(new)
        prefix_end = len(e.fim_ids(prefix + " * 7", "")) - 2  # the last edit was in the suffix: the prefix all hit
        assert got.cached_tokens > prefix_end
    assert common > 32  # reuse beyond whole blocks: the edits were near the end of a 190-odd-token prompt


def test_max_tokens_zero_warms_the_prefix_cache(tiny_checkpoint, plain):
    """llama.cpp's `n_predict: 0` warm-up: the prompt is prefilled into the prefix cache, nothing is generated."""
    prompt = _prompts(plain)[3]
    with Engine(tiny_checkpoint, max_batch_size=2, max_len=256, prefix_cache_mb=8) as e:
        warm = e.generate(prompt, max_tokens=0)
        assert warm.token_ids == [] and warm.finish_reason == "length"
        got = e.generate(prompt, max_tokens=5, ignore_eos=True)
        assert got.cached_tokens == len(prompt) - 1
    assert got.token_ids == plain.generate(prompt, max_tokens=5, ignore_eos=True).token_ids
    assert plain.generate(prompt, max_tokens=0).token_ids == []  # no prefix cache: ends at once, as before


def test_cli_no_speculative_turns_it_off(tiny_checkpoint):
    """`--no-speculative` reaches the engine (every engine command and `dscoder serve` share engine_from_args)."""
    import argparse

    from dscoder.engine import cli

    parser = argparse.ArgumentParser(prog="dscoder")
    cli.register(parser.add_subparsers(dest="command"))
    for flag, want in (([], 8), (["--no-speculative"], 0)):
        args = parser.parse_args(["generate", "--model", str(tiny_checkpoint), *flag, "x"])
        with cli.engine_from_args(args) as e:
            assert e.scheduler.spec_tokens == want


def test_rejected_draft_entries_leave_the_row_and_compaction_keeps_results(plain):
    """After every step a speculating row owns exactly one cache entry per token it has seen but the last (rejected
    draft positions are dropped, none is marked at or after the cursor); and with a cache small enough that rows
    are compacted, the tokens stay those of plain decoding."""
    from dscoder.engine import Scheduler, Sequence

    model, tok = plain.model, plain.tokenizer
    long_prompt, short = _prompts(plain)[1], [5, 6, 7, 8, 9, 5, 6, 7, 8]
    sched = Scheduler(model, max_batch=2, max_len=96, sync_every=4, pad_id=tok.pad_id, spec_tokens=8)
    compactions = []
    compact = sched._compact
    sched._compact = lambda: (compactions.append(sched.cursor), compact())
    a = Sequence(long_prompt, SamplingParams(max_tokens=6, ignore_eos=True), 96, tok.eos_id, tok)
    b = Sequence(short, SamplingParams(max_tokens=80, ignore_eos=True), 96, tok.eos_id, tok)
    sched.add(a)
    for step in range(300):  # bounded
        if step == 1:
            sched.add(b)
        if not sched.has_work():
            break
        sched.step()
        for slot in sched.active:
            seq = sched.slots[slot]
            assert int(sched.mask[slot].sum()) == len(seq.prompt_ids) + len(seq.token_ids) - 1
            assert not sched.mask[slot, sched.cursor:].any()
    assert a.finished and b.finished and compactions
    assert b.spec_steps > 0 and b.spec_accepted < b.spec_drafted  # some drafts were (partly) rejected
    assert a.token_ids == plain.generate(long_prompt, max_tokens=6, ignore_eos=True).token_ids
    assert b.token_ids == plain.generate(short, max_tokens=80, ignore_eos=True).token_ids
