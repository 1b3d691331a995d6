"""Integer weight formats and their matrix products.

Shape legend: N output features, K input features, M rows of activations, G = K / group_size groups.

Stored (portable) layouts, what a checkpoint holds:
- int8: ``q [N, K]`` int8 in [-127, 127] and ``scale [N]``: ``w = q * scale`` (symmetric, per output channel).
- int4: ``q [N, K/2]`` uint8, two 4-bit codes per byte (column 2j in the low nibble, 2j+1 in the high one), each code
  ``c`` in [0, 15] meaning ``c - 8``, and ``scale [N, G]``: ``w = (c - 8) * scale`` per group of ``group_size`` columns
  (symmetric).

Runtime layouts: int8 runs as stored (``torch._weight_int8pack_mm``); int4 is repacked once at load into PyTorch's
CPU tile layout for ``torch._weight_int4pack_mm_for_cpu`` (same size). Every fast product has a plain
dequantize-then-matmul reference (:func:`dequantize_int8`, :func:`dequantize_int4`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# PyTorch's CPU weight-only kernels take bf16 activations well; fp32 ones fall to a slow path (30x on the benchmark
# machine), so activations meet int8/int4 weights in bf16 and the result is cast back.
KERNEL_DTYPE = torch.bfloat16
INT4_CLIP_SEARCH = tuple(0.6 + 0.05 * i for i in range(9))


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., N, K]`` → ``(q int8 [..., N, K], scale fp32 [..., N])``: round to nearest, ``max|w| / 127`` per row."""
    w = w.float()
    scale = (w.abs().amax(dim=-1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[..., None]).to(dtype)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., N, K]`` → ``(q uint8 [..., N, K/2], scale fp32 [..., N, K/group_size])``. Each group's scale is the
    one of ``f * max|w| / 7``, f in {0.6, 0.65, ..., 1}, with the least squared error (clipping the largest weights a
    little rounds the rest finer: 10% less error than f = 1 on Gaussian weights)."""
    *lead, N, K = w.shape
    wg = w.float().reshape(*lead, N, K // group_size, group_size)
    amax = wg.abs().amax(dim=-1).clamp_min(1e-12)
    best_err, scale = None, None
    for f in INT4_CLIP_SEARCH:
        s = amax * (f / 7.0)
        err = (torch.round(wg / s[..., None]).clamp_(-8, 7) * s[..., None] - wg).pow_(2).sum(-1)
        if best_err is None:
            best_err, scale = err, s
        else:
            better = err < best_err
            best_err, scale = torch.where(better, err, best_err), torch.where(better, s, scale)
    codes = (torch.round(wg / scale[..., None]).clamp_(-8, 7) + 8).to(torch.uint8).reshape(*lead, N, K)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), scale


def int4_codes(q: torch.Tensor) -> torch.Tensor:
    """The packed bytes ``[..., N, K/2]`` as codes ``[..., N, K]`` (uint8 in [0, 15])."""
    return torch.stack([q & 0xF, q >> 4], dim=-1).flatten(-2)


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    codes = int4_codes(q).float() - 8.0
    *lead, N, K = codes.shape
    G = scale.shape[-1]
    return (codes.view(*lead, N, G, K // G) * scale.float()[..., None]).view(*lead, N, K).to(dtype)


INT4_PACK_ROWS = 256  # rows repacked per call: a multiple of the CPU layout's 64-row blocks, which pack alone


def int4_padded_rows(n: int) -> int:
    """The kernel takes N in multiples of 16: the rows of a repacked matrix of ``n`` rows."""
    return n + -n % 16


def int4_runtime(q: torch.Tensor, scale: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored int4 ``(q [N, K/2], scale [N, G])`` → the CPU kernel's ``(packed [Np, K/2], scale_zeros [G, Np, 2])``
    (zero points 0: the format is symmetric), N padded to Np, a multiple of 16, with zero rows (code 8, scale 0) that
    the product slices off. Written into ``out`` when given. The rows are packed ``INT4_PACK_ROWS`` at a time, so the
    temporaries (codes as int32, 8 bytes per packed byte) stay a few MB whatever the matrix."""
    N, half = q.shape
    Np = int4_padded_rows(N)
    if out is None:
        out = (torch.empty(Np, half, dtype=torch.uint8), torch.empty(scale.shape[1], Np, 2, dtype=KERNEL_DTYPE))
    packed, scale_zeros = out
    for r0 in range(0, Np, INT4_PACK_ROWS):
        r1 = min(r0 + INT4_PACK_ROWS, Np)
        codes = torch.full((r1 - r0, 2 * half), 8, dtype=torch.int32)
        n = max(0, min(r1, N) - r0)
        codes[:n] = int4_codes(q[r0:r0 + n])
        packed[r0:r1] = torch._convert_weight_to_int4pack_for_cpu(codes, 2)
    scale_zeros[..., 1] = 0
    scale_zeros[:, N:, 0] = 0
    scale_zeros[:, :N, 0] = scale.t()
    return packed, scale_zeros


def int8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [..., K] @ (q * scale).T`` by the weight-only int8 kernel, in ``x``'s dtype."""
    x2 = x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE)
    y = torch._weight_int8pack_mm(x2, q, scale.to(KERNEL_DTYPE))
    return y.view(*x.shape[:-1], q.shape[0]).to(x.dtype)


def int4_mm(x: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor, group_size: int, N: int) -> torch.Tensor:
    """``x [..., K] @ W.T`` by the weight-only int4 kernel (``W``'s first N rows), in ``x``'s dtype."""
    x2 = x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE)
    y = torch._weight_int4pack_mm_for_cpu(x2, packed, group_size, scale_zeros)
    return y[:, :N].reshape(*x.shape[:-1], N).to(x.dtype)


def reference_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The plain path: the dequantized matrix in ``x``'s dtype, one ``F.linear``."""
    return F.linear(x, w.to(x.dtype))
