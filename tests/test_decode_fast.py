"""The native batch-1 decode path (dscoder.engine.native) against the plain model forward it replaces."""

from __future__ import annotations

import subprocess

import pytest
import torch
import torch.nn.functional as F

from dscoder.engine import Engine
from dscoder.engine import native
from dscoder.model import MLACache
from dscoder.quant import quantize_model
from tests.conftest import tiny_config, tiny_model

lib = native.library()
pytestmark = pytest.mark.skipif(lib is None, reason=f"native kernels unavailable: {native.build_error}")


def bf16_model(**overrides):
    return tiny_model(tiny_config(**overrides)).to(torch.bfloat16)


def close(got: torch.Tensor, want: torch.Tensor, ulps: float = 4) -> None:
    """Equal up to bf16 rounding: within ``ulps`` units of bf16's last place at the tensor's largest magnitude."""
    got, want = got.float(), want.float()
    tol = ulps * want.abs().max().item() * 2.0 ** -8
    assert (got - want).abs().max().item() <= tol, ((got - want).abs().max().item(), tol)


def plain_and_native(model, prompt: int = 7, hole: int | None = 2, start: int = 0):
    """One decode step after a prefill of ``prompt`` tokens: (plain logits, native logits, plain cache, native
    cache). ``hole``: a cache entry the row does not attend to; ``start``: a RoPE position offset."""
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt + 1), generator=g)
    pos = torch.arange(start, start + prompt + 1)[None]
    caches = [MLACache(cfg, 1, 32, dtype=torch.bfloat16) for _ in range(2)]
    mask = torch.ones(1, prompt + 1, dtype=torch.bool)
    if hole is not None:
        mask[0, hole] = False
    plan = native.DecodePlan.for_model(model)
    assert plan is not None
    with torch.inference_mode():
        for c in caches:
            model(ids[:, :prompt], position_ids=pos[:, :prompt], cache=c)
        assert plan.usable(ids[:, prompt:], mask, caches[1], prompt)
        want = model(ids[:, prompt:], attention_mask=mask, position_ids=pos[:, prompt:], cache=caches[0],
                     start_pos=prompt).logits[:, -1]
        got = plan.step(ids[:, prompt:], mask, pos[:, prompt:], caches[1], prompt)
    return want, got, caches[0].kv, caches[1].kv


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": 48}, {"n_shared_experts": None},
                                       {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2},
                                       {"norm_topk_prob": False, "routed_scaling_factor": 1.5}])
def test_native_step_equals_model_forward(overrides):
    want, got, kv_want, kv_got = plain_and_native(bf16_model(**overrides), start=5)
    close(got, want)
    close(kv_got, kv_want)
    assert F.cosine_similarity(got.float(), want.float()).item() > 0.9999


def test_native_step_without_mask_and_quantized():
    model = bf16_model()
    want, got, _, _ = plain_and_native(model, hole=None)
    close(got, want)
    for bits, group in ((8, None), (4, 32)):
        want, got, _, _ = plain_and_native(quantize_model(model, bits, group))
        close(got, want)


def test_portable_kernels_take_the_same_step(portable, monkeypatch):
    model = bf16_model()
    want, got, _, _ = plain_and_native(model)
    monkeypatch.setattr(native, "library", lambda: portable)
    for m in (model, quantize_model(model, 8)):
        want, got, _, _ = plain_and_native(m)
        close(got, want)


@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    """The kernels built without -march=native: the portable loops instead of the AVX512 ones."""
    import os

    old = os.environ.get("DSCODER_CACHE")
    os.environ["DSCODER_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        return native._load(native._build([["-O3", "-fopenmp"]]))
    finally:
        if old is None:
            del os.environ["DSCODER_CACHE"]
        else:
            os.environ["DSCODER_CACHE"] = old


@pytest.mark.parametrize("which", ["native", "portable"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("N,K", [(37, 50), (64, 96), (5, 2048)])
def test_linear_kernel_equals_f_linear(N, K, threads, which, request):
    lib = native.library() if which == "native" else request.getfixturevalue("portable")
    g = torch.Generator().manual_seed(N * K)
    x = torch.randn(1, K, generator=g).to(torch.bfloat16)
    w = torch.randn(N, K, generator=g).to(torch.bfloat16)
    y = torch.empty(1, N, dtype=torch.bfloat16)
    lib.dsc_linear(x.data_ptr(), w.data_ptr(), None, 0, N, K, y.data_ptr(), None, threads)
    close(y, F.linear(x.float(), w.float()), ulps=1)
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    s = (torch.rand(N, generator=g) + 0.1).to(torch.bfloat16)
    lib.dsc_linear(x.data_ptr(), q.data_ptr(), s.data_ptr(), 1, N, K, y.data_ptr(), None, threads)
    close(y, F.linear(x.float(), q.float() * s.float()[:, None]), ulps=1)
    res = torch.randn(1, N, generator=g).to(torch.bfloat16)
    out = res.clone()
    lib.dsc_linear(x.data_ptr(), w.data_ptr(), None, 0, N, K, out.data_ptr(), out.data_ptr(), threads)
    close(out, res + F.linear(x, w), ulps=1)



@pytest.mark.parametrize("threads", [1, 2])
def test_int8_kernel_equals_its_fixed_point_reference(threads):
    """The VNNI int8 product is exact integer arithmetic on a fixed-point activation: bit for bit what
    native.int8_linear_reference computes with PyTorch, over magnitudes, lengths with a tail, and a residual add."""
    bits = lib.dsc_int8_fixed_point()
    if bits == 0:
        pytest.skip("this build's int8 products are fp32 (no AVX512-VNNI)")
    g = torch.Generator().manual_seed(11)
    for N, K in ((37, 50), (64, 96), (9, 1408), (21, 2048 + 64 * 3 + 5)):
        for magnitude in (1e-3, 1.0, 300.0):
            x = (torch.randn(1, K, generator=g) * magnitude).to(torch.bfloat16)
            x[0, K // 3] *= 50  # one outlier: the scale follows the largest value
            q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
            s = (torch.rand(N, generator=g) + 0.1).to(torch.bfloat16)
            y = torch.empty(1, N, dtype=torch.bfloat16)
            lib.dsc_linear(x.data_ptr(), q.data_ptr(), s.data_ptr(), 1, N, K, y.data_ptr(), None, threads)
            want = native.int8_linear_reference(x, q, s, bits)
            assert torch.equal(y, want), (N, K, magnitude)
            res = torch.randn(1, N, generator=g).to(torch.bfloat16)
            out = res.clone()
            lib.dsc_linear(x.data_ptr(), q.data_ptr(), s.data_ptr(), 1, N, K, out.data_ptr(), out.data_ptr(), threads)
            assert torch.equal(out, (res.float() + want.float()).to(torch.bfloat16))
    assert bits >= 14  # the documented precision: each value within max|x| 2^-14 of itself

def test_engine_decodes_through_the_plan_with_the_plain_tokens(monkeypatch):
    model = bf16_model()
    prompt = list(range(3, 20))
    fast = Engine(model, max_batch_size=2, speculative=False)
    assert fast.scheduler.native is not None
    calls = []
    step = fast.scheduler.native.step
    monkeypatch.setattr(fast.scheduler.native, "step", lambda *a: calls.append(1) or step(*a))
    got = fast.generate(prompt, max_tokens=12, ignore_eos=True).token_ids
    assert len(calls) == 11  # every decode step (the first token comes from the prefill)
    monkeypatch.setenv("DSCODER_NATIVE", "0")
    plain = Engine(model, max_batch_size=2, speculative=False)
    assert plain.scheduler.native is None
    assert got == plain.generate(prompt, max_tokens=12, ignore_eos=True).token_ids
    # two rows decode through the model's batched forward
    both = fast.generate([prompt, prompt[:9]], max_tokens=6, ignore_eos=True)
    assert both[0].token_ids == got[:6]


def test_float32_models_keep_the_plain_forward():
    assert native.DecodePlan.for_model(tiny_model()) is None
    assert Engine(tiny_model(), speculative=False).scheduler.native is None


def test_the_library_is_built_once_and_a_missing_compiler_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("DSCODER_CACHE", str(tmp_path))
    first = native._build()
    assert first.parent == tmp_path / "kernels"

    def no_compiler(*a, **k):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert native._build() == first  # a second start loads the cached library
    monkeypatch.undo()
    monkeypatch.setenv("DSCODER_CACHE", str(tmp_path / "other"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(OSError):
        native._build()
