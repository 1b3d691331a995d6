"""DeepSeekMoE (DeepSeek-V2 §2.2): fp32 softmax gate, fine-grained routed experts stored stacked, shared experts,
and the paper's balance losses.

Shape legend: N tokens, D hidden, E routed experts, K experts per token, I expert intermediate size,
S = N * K routed slots, G expert groups.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from dscoder.config import ModelConfig


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))`` (the dense layers and the shared experts)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Router: fp32 logits and softmax, greedy or group-limited top-k, the hub's weight semantics."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.method, self.n_group, self.topk_group = config.topk_method, config.n_group, config.topk_group
        self.norm_topk_prob, self.scaling = config.norm_topk_prob, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(weights_NK fp32, experts_NK, scores_NE fp32)``."""
        scores_NE = F.linear(x_ND.float(), self.weight.float()).softmax(dim=-1, dtype=torch.float32)
        if self.method == "greedy":
            weights_NK, experts_NK = torch.topk(scores_NE, k=self.top_k, dim=-1, sorted=False)
        else:  # group_limited_greedy: keep the topk_group groups whose best expert scores highest
            N = scores_NE.shape[0]
            group_best_NG = scores_NE.view(N, self.n_group, -1).amax(dim=-1)
            groups = torch.topk(group_best_NG, k=self.topk_group, dim=-1, sorted=False).indices
            keep_NG = torch.zeros_like(group_best_NG, dtype=torch.bool).scatter_(1, groups, True)
            keep_NE = keep_NG[:, :, None].expand(N, self.n_group, self.n_experts // self.n_group).reshape(N, -1)
            weights_NK, experts_NK = torch.topk(scores_NE.masked_fill(~keep_NE, 0.0), k=self.top_k, dim=-1,
                                                sorted=False)
        # The hub's rule: normalize OR scale (transformers 5 always scales; both agree when norm_topk_prob=False).
        if self.top_k > 1 and self.norm_topk_prob:
            weights_NK = weights_NK / (weights_NK.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            weights_NK = weights_NK * self.scaling
        return weights_NK, experts_NK, scores_NE


# Under torch.compile, up to this many routed slots (tokens x K) take RoutedExperts.forward_direct.
COMPILED_DIRECT_SLOTS = 256


@functools.cache
def grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs forward and backward for this device and dtype (probed once)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        # The caller may be under no_grad, or inside activation checkpointing, whose saved-tensor hooks must not see
        # the probe (its recomputation would not run it again: a cached answer).
        with torch.inference_mode(False), torch.enable_grad(), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            return _probe_grouped_mm(device_type, dtype)
    except Exception:
        return False


def _probe_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    g = torch.Generator(device_type).manual_seed(0)  # its own stream: the probe leaves the caller's random state alone

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g, device=device_type).to(dtype)

    x, w = randn(16, 16).requires_grad_(), randn(2, 16, 16).requires_grad_()
    offs = torch.tensor([8, 16], device=device_type, dtype=torch.int32)
    y = torch._grouped_mm(x, w, offs=offs)
    y.backward(randn(*y.shape))  # a real (non-expanded) gradient
    ref = torch.cat([x[:8] @ w[0], x[8:] @ w[1]])
    return bool(torch.allclose(y, ref, atol=1e-2, rtol=1e-2))


# The gathered fallback copies each slot's expert matrix: at most this many bytes of them per chunk.
GATHER_CHUNK_BYTES = 64 << 20


def _gathered_mm(x_SI: torch.Tensor, w_EIO: torch.Tensor, expert_S: torch.Tensor) -> torch.Tensor:
    """Fallback for ``_grouped_mm``: each slot multiplies by its own expert's matrix, in bounded chunks.

    No loop over experts and no host sync; memory per chunk is bounded by gathering at most
    ``GATHER_CHUNK_BYTES`` of weights.
    """
    per_slot = w_EIO.shape[1] * w_EIO.shape[2] * w_EIO.element_size()
    chunk = max(1, GATHER_CHUNK_BYTES // per_slot)
    outs = [torch.bmm(x_SI[i:i + chunk, None, :], w_EIO[expert_S[i:i + chunk]])[:, 0]
            for i in range(0, max(x_SI.shape[0], 1), chunk)]  # one (empty) product when S = 0
    return torch.cat(outs) if len(outs) != 1 else outs[0]


def expert_swiglu(x_SD: torch.Tensor, weight_S: torch.Tensor, expert_S: torch.Tensor, gate_up_EOD: torch.Tensor,
                  down_EDI: torch.Tensor) -> torch.Tensor:
    """The routed experts' SwiGLU over slots already sorted by expert (``expert_S`` ascending, in
    ``[0, gate_up_EOD.shape[0])``), each slot's output scaled by its routing weight: two grouped matmuls.

    Shared by :class:`RoutedExperts` and the expert-parallel wrapper (which passes its local experts' weights).
    """
    device = x_SD.device.type
    if torch.is_autocast_enabled(device):  # autocast does not cover _grouped_mm: cast as it casts a matmul's inputs
        dtype = torch.get_autocast_dtype(device)  # (else fp32 activations under bf16 autocast take the gathered
        x_SD, gate_up_EOD, down_EDI = x_SD.to(dtype), gate_up_EOD.to(dtype), down_EDI.to(dtype)  # path: CUDA OOM)
    # (no slots happens under expert parallelism: the CPU _grouped_mm backward fails on an empty input)
    # (torch.compile has no fp32 _grouped_mm: compiled graphs take the gathered path)
    rows_S = None  # each slot's row in the padded layout, when groups are padded (below)
    if x_SD.shape[0] > 0 and grouped_mm_works(x_SD.device.type, x_SD.dtype) and not torch.compiler.is_compiling():
        counts_E = torch.zeros(gate_up_EOD.shape[0], dtype=torch.int32, device=x_SD.device)
        counts_E.scatter_add_(0, expert_S, torch.ones_like(expert_S, dtype=torch.int32))
        if x_SD.device.type == "cpu" and x_SD.dtype in (torch.bfloat16, torch.float16):
            rows_S, counts_E = _aligned_rows(expert_S, counts_E, CPU_GROUP_ROWS)
            x_SD = x_SD.new_zeros(int(counts_E.sum()), x_SD.shape[1]).index_copy(0, rows_S, x_SD)
            weight_S = weight_S.new_zeros(x_SD.shape[0]).index_copy(0, rows_S, weight_S)  # padding rows weigh 0
        offs_E = counts_E.cumsum(0, dtype=torch.int32)
        mm = lambda a, w: torch._grouped_mm(a, w, offs=offs_E)  # noqa: E731
    else:
        mm = lambda a, w: _gathered_mm(a, w, expert_S)  # noqa: E731
    gate, up = mm(x_SD, gate_up_EOD.transpose(1, 2)).chunk(2, dim=-1)
    # Weighting the rows before the (linear) down projection equals weighting its output, on I < D columns.
    act_SI = F.silu(gate) * up * weight_S[:, None].to(x_SD.dtype)
    y_SD = mm(act_SI, down_EDI.transpose(1, 2))
    return y_SD if rows_S is None else y_SD.index_select(0, rows_S)


# On CPU, bf16/fp16 matmuls run through oneDNN, which builds (JIT-compiles) a kernel per new shape and caches it:
# with each expert's row count changing every step, a training step spent most of its MoE time building kernels
# (0.6 ms for a 53 x 128 x 128 product, against 0.03 ms cached). Groups padded to a multiple of this many rows
# (zero rows, weighted 0) repeat a few dozen shapes, which the cache keeps.
CPU_GROUP_ROWS = 64


def _aligned_rows(expert_S: torch.Tensor, counts_E: torch.Tensor, align: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For slots sorted by expert: each slot's row when every expert's group is padded to a multiple of ``align``
    rows, and the padded group sizes."""
    padded_E = (counts_E + align - 1) // align * align
    first_E = counts_E.cumsum(0) - counts_E  # each expert's first slot
    start_E = padded_E.cumsum(0) - padded_E  # and first padded row
    slot_S = torch.arange(expert_S.shape[0], device=expert_S.device)
    return start_E[expert_S] + slot_S - first_E[expert_S], padded_E


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored stacked, as transformers 5 names them: ``gate_up_proj [E, 2I, D]`` (gate rows, then
    up rows) and ``down_proj [E, D, I]``. Tokens are sorted by expert and run as two grouped matmuls."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, D, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.n_experts, self.intermediate = E, I
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate_up [E, 2I, D], down [E, D, I])`` the forward runs on (a LoRA subclass adds its update)."""
        return self.gate_up_proj, self.down_proj

    def forward(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor) -> torch.Tensor:
        N, K = experts_NK.shape
        if torch.compiler.is_compiling() and N * K <= COMPILED_DIRECT_SLOTS:
            return self.forward_direct(x_ND, weights_NK, experts_NK)
        flat_S = experts_NK.reshape(-1)
        order_S = torch.argsort(flat_S, stable=True)
        y_SD = expert_swiglu(x_ND[order_S // K], weights_NK.reshape(-1)[order_S], flat_S[order_S],
                             *self.stacked_weights())
        # Undo the sort and add each token's K expert outputs (the sum accumulates in fp32).
        y_unsorted = torch.empty_like(y_SD).index_copy_(0, order_S, y_SD)
        return y_unsorted.view(N, K, -1).sum(dim=1)

    def forward_direct(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor) -> torch.Tensor:
        """Each slot reads its expert's rows where they lie: products and sums over ``W[expert]`` with no sort and
        no gathered copy once torch.compile fuses the indexing into the reductions (for decode-sized batches; in
        eager mode ``W[experts]`` would be copied out)."""
        gate_up_EOD, down_EDI = self.stacked_weights()
        gate_up_NKO = (x_ND[:, None, None, :] * gate_up_EOD[experts_NK]).sum(-1)
        gate, up = gate_up_NKO.float().chunk(2, dim=-1)
        act_NKI = (F.silu(gate) * up * weights_NK[..., None]).to(x_ND.dtype)
        y_NKD = (act_NKI[:, :, None, :] * down_EDI[experts_NK]).sum(-1)
        return y_NKD.float().sum(dim=1).to(x_ND.dtype)

    def forward_reference(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor) -> torch.Tensor:
        """Plain path: every expert in turn over the tokens that chose it. For tests."""
        out = torch.zeros(x_ND.shape, dtype=torch.float32, device=x_ND.device)
        gate_up_EOD, down_EDI = self.stacked_weights()
        for e in range(self.n_experts):
            token, slot = torch.nonzero(experts_NK == e, as_tuple=True)
            gate, up = (x_ND[token] @ gate_up_EOD[e].T).chunk(2, dim=-1)
            y = (F.silu(gate) * up) @ down_EDI[e].T
            out.index_add_(0, token, y.float() * weights_NK[token, slot, None])
        return out.to(x_ND.dtype)


class MoE(nn.Module):
    """Routed experts plus always-on shared experts; computes the balance losses while training."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.gate = Gate(config)
        self.experts = RoutedExperts(config)
        n_shared = config.n_shared_experts or 0
        self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * n_shared) if n_shared else None

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Returns ``(y_BTD, aux, counts_E)``: while training, the balance loss and the expert load (tokens routed
        to each expert, fp32, no host sync) for the trainer's statistics; else ``None, None``."""
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        weights_NK, experts_NK, scores_NE = self.gate(x_ND)
        y_ND = self.experts(x_ND, weights_NK, experts_NK)
        if self.shared_experts is not None:
            y_ND = y_ND + self.shared_experts(x_ND)
        aux = counts_E = None
        if self.training:
            aux = balance_loss(self.config, scores_NE.view(B, T, -1), experts_NK.view(B, T, -1))
            flat = experts_NK.detach().reshape(-1)
            counts_E = torch.zeros(self.config.n_routed_experts, device=flat.device).scatter_add_(
                0, flat, torch.ones_like(flat, dtype=torch.float32))
        return y_ND.view(B, T, D), aux, counts_E


def balance_loss(config: ModelConfig, scores_BTE: torch.Tensor, experts_BTK: torch.Tensor) -> torch.Tensor | None:
    """The paper's auxiliary losses (DeepSeek-V2 eq. 23-31), summed; None when all their weights are 0.

    - expert level (``aux_loss_alpha``): ``alpha1 * sum_i f_i P_i`` with ``f_i = E/(K T) * #tokens choosing i``
      and ``P_i`` the mean score of expert i; per sequence and then averaged when ``seq_aux`` (the hub's rule),
      else over the whole batch;
    - device level (``device_aux_loss_alpha``): experts split into ``balance_devices`` contiguous groups,
      ``f'_d`` the mean ``f_i`` and ``P'_d`` the sum of ``P_i`` over group d;
    - communication (``comm_aux_loss_alpha``): ``f''_d = D/(M T) * #tokens sent to group d``, M =
      ``balance_max_devices``, ``P''_d = P'_d``.
    """
    a1, a2, a3 = config.aux_loss_alpha, config.device_aux_loss_alpha, config.comm_aux_loss_alpha
    if not (a1 or a2 or a3):
        return None
    B, T, E = scores_BTE.shape
    K = experts_BTK.shape[-1]
    ones = torch.ones_like(experts_BTK, dtype=scores_BTE.dtype)
    if config.seq_aux:
        counts_BE = torch.zeros(B, E, dtype=scores_BTE.dtype, device=scores_BTE.device)
        counts_BE.scatter_add_(1, experts_BTK.reshape(B, -1), ones.reshape(B, -1))
        f_BE, p_BE = counts_BE * E / (K * T), scores_BTE.mean(dim=1)
    else:
        counts_E = torch.zeros(E, dtype=scores_BTE.dtype, device=scores_BTE.device)
        counts_E.scatter_add_(0, experts_BTK.reshape(-1), ones.reshape(-1))
        f_BE, p_BE = (counts_E * E / (K * B * T))[None], scores_BTE.reshape(-1, E).mean(dim=0)[None]
    loss = a1 * (f_BE * p_BE).sum(-1).mean()
    if a2 or a3:
        Dv, M = config.balance_devices, config.balance_max_devices
        p_dev = p_BE.view(p_BE.shape[0], Dv, -1).sum(-1)
        if a2:
            loss = loss + a2 * (f_BE.view(f_BE.shape[0], Dv, -1).mean(-1) * p_dev).sum(-1).mean()
        if a3:
            device_BTK = experts_BTK // (E // Dv)
            sent_BTD = torch.zeros(B, T, Dv, dtype=torch.bool, device=scores_BTE.device)
            sent_BTD.scatter_(2, device_BTK, True)
            if config.seq_aux:
                f_dev = sent_BTD.float().sum(1) * Dv / (M * T)
            else:
                f_dev = (sent_BTD.float().sum((0, 1)) * Dv / (M * B * T))[None]
            loss = loss + a3 * (f_dev * p_dev).sum(-1).mean()
    return loss
