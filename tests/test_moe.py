"""DeepSeekMoE: the grouped-matmul path, its fallback and the plain reference agree; gate semantics; losses."""

from __future__ import annotations

import torch

from conftest import tiny_config, tiny_model
from dscoder.model import moe as moe_mod
from dscoder.model.moe import Gate, MoE, RoutedExperts, balance_loss


_cfg = tiny_config


def _experts(cfg, seed=0):
    torch.manual_seed(seed)
    ex = RoutedExperts(cfg)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, 0.3)
        ex.down_proj.normal_(0, 0.3)
    return ex


def _route(cfg, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.hidden_size, generator=g)
    experts = torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[: cfg.num_experts_per_tok]
                           for _ in range(n)])
    weights = torch.rand(n, cfg.num_experts_per_tok, generator=g)
    return x, weights, experts


def test_grouped_mm_matches_reference_forward_and_backward():
    cfg = _cfg()
    ex = _experts(cfg)
    x, w, e = _route(cfg, 37)
    x.requires_grad_(True)
    assert moe_mod.grouped_mm_works("cpu", torch.float32)
    fast = ex(x, w, e)
    ref = ex.forward_reference(x, w, e)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(fast)
    gx_fast, gw_fast = torch.autograd.grad(fast, (x, ex.gate_up_proj), g)
    gx_ref, gw_ref = torch.autograd.grad(ex.forward_reference(x, w, e), (x, ex.gate_up_proj), g)
    torch.testing.assert_close(gx_fast, gx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw_fast, gw_ref, rtol=1e-5, atol=1e-5)


def test_cpu_bf16_pads_each_expert_group_and_matches_reference(monkeypatch):
    """Under bf16 autocast on CPU each expert's rows are padded to a multiple of CPU_GROUP_ROWS (so oneDNN reuses its
    kernels): the grouped products see only aligned group sizes, and output and gradients match the fp32 reference
    within bf16 precision, and the unpadded bf16 path."""
    cfg = _cfg()
    ex = _experts(cfg)
    x, w, e = _route(cfg, 37)
    x.requires_grad_(True)
    assert moe_mod.grouped_mm_works("cpu", torch.bfloat16)  # probed before the products are recorded
    seen = []
    grouped = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda a, b, offs: seen.append(offs.tolist()) or grouped(a, b, offs=offs))

    def run(align):
        monkeypatch.setattr(moe_mod, "CPU_GROUP_ROWS", align)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ex(x, w, e).float()
        return (y, *torch.autograd.grad(y, (x, ex.gate_up_proj, ex.down_proj), g))

    g = torch.randn(37, cfg.hidden_size)
    padded = run(16)
    sizes = [b - a for offs in seen for a, b in zip([0] + offs[:-1], offs)]
    assert seen and all(size % 16 == 0 for size in sizes) and max(seen[0]) > 37 * cfg.num_experts_per_tok
    ref_y = ex.forward_reference(x, w, e)
    ref = (ref_y, *torch.autograd.grad(ref_y, (x, ex.gate_up_proj, ex.down_proj), g))
    for got, want in zip(padded, ref):
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * float(want.detach().abs().max()))
    for got, want in zip(padded, run(1)):
        torch.testing.assert_close(got, want, rtol=0.02, atol=0.01 * float(want.detach().abs().max()))


def test_aligned_rows_keep_order_inside_padded_groups():
    expert_S = torch.tensor([0, 0, 0, 2, 2, 3, 3, 3, 3, 3])
    counts_E = torch.tensor([3, 0, 2, 5], dtype=torch.int32)
    rows_S, padded_E = moe_mod._aligned_rows(expert_S, counts_E, 4)
    assert padded_E.tolist() == [4, 0, 4, 8]
    assert rows_S.tolist() == [0, 1, 2, 4, 5, 8, 9, 10, 11, 12]


def test_fallback_matches_reference(monkeypatch):
    cfg = _cfg()
    ex = _experts(cfg)
    x, w, e = _route(cfg, 29)
    monkeypatch.setattr(moe_mod, "grouped_mm_works", lambda *a: False)
    monkeypatch.setattr(torch, "_grouped_mm", None)  # the fallback must not touch it
    torch.testing.assert_close(ex(x, w, e), ex.forward_reference(x, w, e), rtol=1e-5, atol=1e-5)


def test_direct_path_matches_reference():
    """The decode path torch.compile takes (each slot reads its own expert's weights), run here in eager mode."""
    cfg = _cfg()
    ex = _experts(cfg)
    for n in (1, 8):
        x, w, e = _route(cfg, n, seed=n)
        torch.testing.assert_close(ex.forward_direct(x, w, e), ex.forward_reference(x, w, e), rtol=1e-5, atol=1e-5)


def test_gathered_mm_chunks_agree(monkeypatch):
    """50 slots in chunks of 7 (the last one ragged) give the unchunked product."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(50, 8, generator=g), torch.randn(4, 8, 6, generator=g)
    idx = torch.randint(0, 4, (50,), generator=g)
    expected = torch.einsum("si,sio->so", x, w[idx])
    monkeypatch.setattr(moe_mod, "GATHER_CHUNK_BYTES", 7 * 8 * 6 * 4)  # 7 slots' fp32 [8, 6] matrices
    chunks = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b: chunks.append(a.shape[0]) or bmm(a, b))
    got = moe_mod._gathered_mm(x, w, idx)
    assert chunks == [7] * 7 + [1]
    assert torch.allclose(got, expected, atol=1e-5)


def test_group_limited_routing_stays_in_top_groups():
    cfg = _cfg(topk_method="group_limited_greedy", n_group=4, topk_group=2, num_experts_per_tok=3)
    torch.manual_seed(0)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=1.0)
    x = torch.randn(64, cfg.hidden_size)
    _, experts, scores = gate(x)
    group_best = scores.view(64, 4, 2).amax(-1)
    top_groups = group_best.topk(2, dim=-1).indices
    for t in range(64):
        assert set((experts[t] // 2).tolist()) <= set(top_groups[t].tolist())


def test_weight_semantics_normalize_or_scale():
    x = torch.randn(10, 64)
    torch.manual_seed(0)
    scaled = Gate(_cfg(routed_scaling_factor=16.0))
    torch.nn.init.normal_(scaled.weight)
    w, e, scores = scaled(x)
    assert torch.allclose(w, scores.gather(1, e) * 16.0)
    normed = Gate(_cfg(norm_topk_prob=True, routed_scaling_factor=16.0))
    normed.load_state_dict(scaled.state_dict())
    w2, _, _ = normed(x)
    assert torch.allclose(w2.sum(-1), torch.ones(10))


def test_gate_runs_in_fp32_for_bf16_inputs():
    gate = Gate(_cfg()).to(torch.bfloat16)
    torch.nn.init.normal_(gate.weight)
    w, _, scores = gate(torch.randn(4, 64, dtype=torch.bfloat16))
    assert w.dtype == scores.dtype == torch.float32


def _naive_losses(cfg, scores, experts):
    """Direct transcription of DeepSeek-V2 eq. 23-31, per sequence, averaged over the batch."""
    B, T, E = scores.shape
    K, Dv, M = experts.shape[-1], cfg.balance_devices, cfg.balance_max_devices
    total = 0.0
    for b in range(B):
        f = torch.tensor([E / (K * T) * sum(int(i in experts[b, t].tolist()) for t in range(T)) for i in range(E)])
        P = scores[b].mean(0)
        exp_loss = (f * P).sum()
        groups = torch.arange(E).view(Dv, -1)
        f_dev = torch.stack([f[g].mean() for g in groups])
        P_dev = torch.stack([P[g].sum() for g in groups])
        sent = torch.tensor([[any(int(j) in g.tolist() for j in experts[b, t]) for g in groups] for t in range(T)])
        f_comm = Dv / (M * T) * sent.float().sum(0)
        total = total + (cfg.aux_loss_alpha * exp_loss + cfg.device_aux_loss_alpha * (f_dev * P_dev).sum()
                         + cfg.comm_aux_loss_alpha * (f_comm * P_dev).sum())
    return total / B


def test_balance_losses_match_paper_formulas():
    cfg = _cfg(aux_loss_alpha=0.003, device_aux_loss_alpha=0.05, comm_aux_loss_alpha=0.02, balance_devices=4,
               balance_max_devices=2, num_experts_per_tok=2)
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 9, 8, generator=g).softmax(-1)
    experts = scores.topk(2, dim=-1).indices
    assert torch.allclose(balance_loss(cfg, scores, experts), _naive_losses(cfg, scores, experts), atol=1e-6)


def test_balance_loss_batch_level_and_training_only():
    cfg = _cfg(seq_aux=False)
    scores = torch.full((2, 4, 8), 1 / 8)
    experts = torch.arange(8).view(1, 4, 2).expand(2, 4, 2)  # perfectly balanced: f_i = 1, P_i = 1/8
    assert torch.allclose(balance_loss(cfg, scores, experts), torch.tensor(cfg.aux_loss_alpha))
    layer = MoE(_cfg())
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 5, 64)
    assert layer.eval()(x)[1:] == (None, None)
    _, aux, counts = layer.train()(x)
    assert aux is not None and aux.requires_grad
    assert counts.shape == (8,) and counts.sum() == 2 * 5 * 2
    assert balance_loss(_cfg(aux_loss_alpha=0.0), scores, experts) is None


def test_expert_load_is_returned_not_kept_on_the_modules():
    """A training forward returns each MoE layer's tokens per expert; no module keeps them as state."""
    model = tiny_model().train()
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    before = {name: set(vars(m)) for name, m in model.named_modules()}
    out = model(ids)
    n_moe = sum(model.config.is_moe_layer(i) for i in range(model.config.num_hidden_layers))
    assert out.expert_counts.shape == (n_moe, model.config.n_routed_experts)
    assert out.expert_counts.sum(-1).tolist() == [2 * 7 * model.config.num_experts_per_tok] * n_moe
    first_moe = model.model.layers[1]
    x_ND = first_moe.post_attention_layernorm(_after_attention(model, ids)).flatten(0, 1)
    experts_NK = first_moe.mlp.gate(x_ND)[1]  # its routing, recomputed
    want = torch.bincount(experts_NK.flatten(), minlength=model.config.n_routed_experts).float()
    assert torch.equal(out.expert_counts[0], want)
    assert {name: set(vars(m)) for name, m in model.named_modules()} == before
    assert model.eval()(ids).expert_counts is None


def _after_attention(model, ids):
    """The residual stream of the first MoE layer after its attention (the input of its MLP's norm)."""
    T = ids.shape[1]
    cos, sin = model.model.rotary(torch.arange(T).expand(ids.shape[0], T))
    h = model.model.embed_tokens(ids)
    h, _, _ = model.model.layers[0](h, cos, sin, None, None, 0)
    layer = model.model.layers[1]
    return h + layer.self_attn(layer.input_layernorm(h), cos, sin, None, None, 0)
