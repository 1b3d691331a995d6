"""Quantized stand-ins for the model's linear layers and stacked routed experts, and the in-memory conversion.

A :class:`QuantWeight` holds one matrix ``[N, K]`` or a stack ``[E, N, K]`` as ``qweight`` and ``scales`` buffers in
one of three layouts: ``int8`` and ``int4`` (the fast CPU kernels' runtime layouts) or ``reference`` (the stored
layout of :mod:`dscoder.quant.kernels`, multiplied by dequantize-then-matmul; for tests and other devices).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dscoder.errors import DscoderError
from dscoder.quant import kernels

SUPPORTED_BITS = (8, 4)
INT4_GROUP_SIZES = (256, 128, 64, 32)  # what the CPU int4 kernel takes


def check_scheme(bits: int, group_size: int | None) -> None:
    if bits not in SUPPORTED_BITS:
        raise DscoderError(f"--bits {bits}: unsupported bit width (expected 8 or 4)")
    if bits == 4 and group_size not in INT4_GROUP_SIZES:
        raise DscoderError(f"--group-size {group_size}: expected one of {', '.join(map(str, INT4_GROUP_SIZES))} for int4")
    if bits == 8 and group_size is not None:
        raise DscoderError("--group-size applies to --bits 4 (int8 is per output channel)")


def int4_group(K: int, group_size: int, name: str = "") -> int:
    """The group size used for a matrix with K inputs: ``group_size``, else the largest smaller kernel size dividing
    K (Lite's dense down projection has K = 10944 = 171 x 64)."""
    for g in INT4_GROUP_SIZES:
        if g <= group_size and K % g == 0:
            return g
    raise DscoderError(f"{name or 'a layer'}: {K} input features is not a multiple of 32; int4 needs groups of "
                       f"32 to 256 columns (quantize with --bits 8)")


class QuantWeight(nn.Module):
    """``[E,] N x K`` weights as integers and scales. ``layout`` is ``int8``, ``int4`` or ``reference``; ``stack`` the
    leading expert count or None; ``group_size`` the int4 group (None for int8)."""

    def __init__(self, N: int, K: int, bits: int, group_size: int | None, layout: str, stack: int | None = None,
                 device="meta", dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.N, self.K, self.bits, self.group_size, self.layout = N, K, bits, group_size, layout
        lead = () if stack is None else (stack,)
        if bits == 8:
            q_shape, q_dtype, s_shape = (*lead, N, K), torch.int8, (*lead, N)
        elif layout == "int4":
            G, Np = K // group_size, kernels.int4_padded_rows(N)
            q_shape, q_dtype, s_shape = (*lead, Np, K // 2), torch.uint8, (*lead, G, Np, 2)
        else:
            q_shape, q_dtype, s_shape = (*lead, N, K // 2), torch.uint8, (*lead, N, K // group_size)
        self.register_buffer("qweight", torch.empty(q_shape, dtype=q_dtype, device=device))
        self.register_buffer("scales", torch.empty(s_shape, dtype=dtype if layout != "int4" else kernels.KERNEL_DTYPE,
                                                   device=device))

    def extra_repr(self) -> str:
        return f"N={self.N}, K={self.K}, bits={self.bits}, group_size={self.group_size}, layout={self.layout}"

    def matmul(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        """``x [..., K] @ W.T`` (``W = self[index]`` for a stack)."""
        q, s = (self.qweight, self.scales) if index is None else (self.qweight[index], self.scales[index])
        if self.layout == "int8":
            return kernels.int8_mm(x, q, s)
        if self.layout == "int4":
            return kernels.int4_mm(x, q, s, self.group_size, self.N)
        return kernels.reference_mm(x, self.dequantize(index))

    def dequantize(self, index: int | None = None) -> torch.Tensor:
        """The weight in fp32 (reference layout, or int8)."""
        q, s = (self.qweight, self.scales) if index is None else (self.qweight[index], self.scales[index])
        if self.bits == 8:
            return kernels.dequantize_int8(q, s)
        if self.layout == "int4":
            raise NotImplementedError("the int4 runtime layout is the kernel's; dequantize a reference-layout weight")
        return kernels.dequantize_int4(q, s)


class QuantLinear(nn.Module):
    """A bias-free ``nn.Linear`` with a :class:`QuantWeight` (state keys ``NAME.weight.qweight`` / ``.scales``)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None, layout: str,
                 device="meta", dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = QuantWeight(out_features, in_features, bits, group_size, layout, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.matmul(x)


class QuantExperts(nn.Module):
    """Stacked routed experts (``gate_up_proj [E, 2I, D]``, ``down_proj [E, D, I]``) as integers. Each expert that
    some token chose runs on its own rows only, reading its slice of the stack in place: a decode step reads the
    K chosen experts' weights and no others."""

    def __init__(self, n_experts: int, hidden: int, intermediate: int, bits: int, gate_up_group: int | None,
                 down_group: int | None, layout: str, device="meta", dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.n_experts, self.intermediate = n_experts, intermediate
        self.gate_up_proj = QuantWeight(2 * intermediate, hidden, bits, gate_up_group, layout, n_experts, device, dtype)
        self.down_proj = QuantWeight(hidden, intermediate, bits, down_group, layout, n_experts, device, dtype)

    def forward(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor) -> torch.Tensor:
        N, K = experts_NK.shape
        flat_S = experts_NK.reshape(-1)
        order_S = torch.argsort(flat_S, stable=True)
        counts = torch.bincount(flat_S, minlength=self.n_experts).tolist()  # the CPU path: a host read is free
        out_ND = torch.zeros(x_ND.shape, dtype=torch.float32, device=x_ND.device)
        w_S = weights_NK.reshape(-1)
        start = 0
        for e, c in enumerate(counts):
            if not c:
                continue
            slots = order_S[start:start + c]
            start += c
            tokens = slots // K
            gate, up = self.gate_up_proj.matmul(x_ND[tokens], e).chunk(2, dim=-1)
            act = (F.silu(gate.float()) * up.float() * w_S[slots, None]).to(x_ND.dtype)
            out_ND.index_add_(0, tokens, self.down_proj.matmul(act, e).float())
        return out_ND.to(x_ND.dtype)


def quantizable_linears(model: nn.Module) -> list[str]:
    """Names of the linear layers a quantized checkpoint stores as integers: every ``nn.Linear`` but ``kv_b_proj``
    (absorbed decode uses it as a per-head matrix, and it is 2% of Lite's weights) and a head tied to the
    embeddings."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith("kv_b_proj"):
            if name == "lm_head" and model.config.tie_word_embeddings:
                continue
            names.append(name)
    return names


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def swap_modules(model: nn.Module, bits: int, group_size: int | None, layout: str, dtype: torch.dtype) -> None:
    """Replace the quantizable modules of ``model`` by empty (meta) quantized ones of the same shapes."""
    from dscoder.model.moe import RoutedExperts

    def group(K: int, name: str) -> int | None:
        return int4_group(K, group_size, name) if bits == 4 else None

    for name in quantizable_linears(model):
        lin = model.get_submodule(name)
        _set(model, name, QuantLinear(lin.in_features, lin.out_features, bits, group(lin.in_features, name), layout,
                                      dtype=dtype))
    for name, module in list(model.named_modules()):
        if isinstance(module, RoutedExperts):
            E, twoI, D = module.gate_up_proj.shape
            _set(model, name, QuantExperts(E, D, twoI // 2, bits, group(D, f"{name}.gate_up_proj"),
                                           group(twoI // 2, f"{name}.down_proj"), layout, dtype=dtype))


def stored_weights(model: nn.Module, bits: int, group_size: int | None):
    """Yield ``(state key prefix, qweight, scales)`` in the stored layout for every quantizable weight of a float
    model (one matrix or expert stack at a time)."""
    from dscoder.model.moe import RoutedExperts

    def quantize(w: torch.Tensor, name: str):
        if bits == 8:
            return quantize_int8(w)
        return kernels.quantize_int4(w, int4_group(w.shape[-1], group_size, name))

    for name in quantizable_linears(model):
        q, s = quantize(model.get_submodule(name).weight.detach(), name)
        yield f"{name}.weight", q, s
    for name, module in model.named_modules():
        if isinstance(module, RoutedExperts):
            for part in ("gate_up_proj", "down_proj"):
                w = getattr(module, part).detach()
                qs, ss = zip(*(quantize(w[e], f"{name}.{part}") for e in range(w.shape[0])))  # bounded temporaries
                yield f"{name}.{part}", torch.stack(qs), torch.stack(ss)


def quantize_int8(w: torch.Tensor):
    return kernels.quantize_int8(w)


def to_runtime(bits: int, layout: str, q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype, release=None):
    """Stored ``(q, scales)`` → the layout's buffers. int4 stacks are repacked one expert at a time into one
    preallocated stack (a list of repacked experts stacked at the end held the weights twice); ``release(t)``, when
    given, is called on each stored matrix and its scales once they are repacked (the loader drops their pages)."""
    if bits == 8 or layout == "reference":
        return q, s.to(dtype)
    if q.dim() == 2:
        out = kernels.int4_runtime(q, s)
        if release is not None:
            release(q), release(s)
        return out
    E, N, half = q.shape
    Np = kernels.int4_padded_rows(N)
    packed = torch.empty(E, Np, half, dtype=torch.uint8)
    scale_zeros = torch.empty(E, s.shape[-1], Np, 2, dtype=kernels.KERNEL_DTYPE)
    for e in range(E):
        kernels.int4_runtime(q[e], s[e], out=(packed[e], scale_zeros[e]))
        if release is not None:
            release(q[e]), release(s[e])
    return packed, scale_zeros


def default_layout(bits: int, device: torch.device | str) -> str:
    """The fast kernels are PyTorch's CPU ones; other devices multiply by dequantize-then-matmul."""
    if torch.device(device).type != "cpu":
        return "reference"
    return "int8" if bits == 8 else "int4"


@torch.no_grad()
def quantize_model(model: nn.Module, bits: int = 8, group_size: int | None = None, *, layout: str | None = None):
    """A quantized copy of a float :class:`~dscoder.DeepseekV2` in memory (the float model is left as it is).
    ``layout`` ``"reference"`` multiplies by dequantize-then-matmul; default: the CPU kernels."""
    from dscoder.model.transformer import DeepseekV2

    if bits == 4 and group_size is None:
        group_size = 128
    check_scheme(bits, group_size)
    device = next(model.parameters()).device
    layout = layout or default_layout(bits, device)
    dtype = model.model.embed_tokens.weight.dtype
    state = {}
    quantized = set()
    for key, q, s in stored_weights(model, bits, group_size):
        state[f"{key}.qweight"], state[f"{key}.scales"] = to_runtime(bits, layout, q, s, dtype)
        quantized.add(key)
    for key, t in model.state_dict().items():
        if not any(key == k or key.startswith(k + ".") for k in quantized):
            state[key] = t.clone()
    with torch.device("meta"):
        out = DeepseekV2(model.config)
    swap_modules(out, bits, group_size, layout, dtype)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    out.load_state_dict(state, strict=not model.config.tie_word_embeddings, assign=True)
    if model.config.tie_word_embeddings:
        out.lm_head.weight = out.model.embed_tokens.weight
    out.reset_buffers()
    out.quantization = {"bits": bits, "group_size": group_size if bits == 4 else None}
    return out.eval()
