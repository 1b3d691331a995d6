"""Batch-1 CPU decode through native kernels: one token of one sequence, weights streamed once.

At batch 1 a decode step is a chain of matrix-vector products, bound by how fast the weights are read. PyTorch's
CPU kernels stream a bf16 matrix-vector product at a fraction of the memory bandwidth (its oneDNN GEMM and its
``_weight_int8pack_mm`` are built for many rows), and the plain model adds hundreds of small ops per token (the MoE
sort and grouped GEMM for one token, einsums that copy ``kv_b_proj`` every step). :class:`DecodePlan` runs the step
as about a dozen calls per layer: products over bf16 or int8 weights (``native.c``: AVX512-BF16 dot products where
the CPU has them, else AVX512 or portable loops; int8 as VNNI byte products on a 15-bit fixed-point copy of the
activation, :func:`int8_linear_reference`; the rows split over the threads), the absorbed MLA step over the
latent cache in one call, a SwiGLU block over the chosen experts' rows in one call; norms, rope angles, the router
and the LM head's sampling stay PyTorch ops of the model's own modules. It computes what the model's forward computes,
rounding to bf16 where that does (tests/test_decode_fast.py holds it to the plain path).

The kernels are compiled with the machine's C compiler (``$CC`` or ``cc``; ``-O3 -march=native -fopenmp``) on first
use, into ``$DSCODER_CACHE/kernels`` (default ``~/.cache/dscoder/kernels``), once per source, compiler and CPU; a
second start loads the library (milliseconds). Without a compiler, on other devices, for float32 models or with
``DSCODER_NATIVE=0`` the engine runs the model's forward as before.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SOURCE = Path(__file__).with_name("native.c")
FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"], ["-O3"])  # first that builds
MAX_EXPERTS_PER_TOKEN = 64  # native.c's per-call expert table
MAX_ROUTED_EXPERTS = 1024  # native.c's router score table

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
build_error: str | None = None  # why the kernels are unavailable (for `dscoder` diagnostics and tests)


def cache_root() -> Path:
    """``$DSCODER_CACHE``, else ``$XDG_CACHE_HOME/dscoder`` (``~/.cache/dscoder``): compiled kernels and graphs."""
    root = os.environ.get("DSCODER_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dscoder"


def cache_dir() -> Path:
    return cache_root() / "kernels"


def use_persistent_inductor_cache() -> None:
    """Point inductor's on-disk cache (compiled graphs, kernels) at ``cache_root()/inductor`` unless the user chose
    one (``TORCHINDUCTOR_CACHE_DIR``): its default lives under /tmp, which a reboot empties, and a compiled engine
    that finds its graphs there starts in seconds instead of compiling again."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags (a shared home may serve several machines)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return platform.processor() or platform.machine()


def library() -> ctypes.CDLL | None:
    """The compiled kernels, building them on first use; None when disabled or no compiler works."""
    global _lib, _tried, build_error
    if os.environ.get("DSCODER_NATIVE", "1") == "0":
        return None
    with _lock:
        if _tried:
            return _lib
        _tried = True
        try:
            _lib = _load(_build())
        except (OSError, subprocess.SubprocessError, RuntimeError) as e:
            build_error = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            _lib = None
        return _lib


def _build(flag_sets=FLAG_SETS) -> Path:
    source = SOURCE.read_bytes()
    cc = os.environ.get("CC") or "cc"
    errors = []
    for flags in flag_sets:
        key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(flags).encode(), _cpu_id().encode(),
                                         platform.machine().encode()])).hexdigest()[:16]
        out = cache_dir() / f"dscoder_native_{key}.so"
        if out.is_file():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            so = Path(tmp) / out.name
            proc = subprocess.run([cc, *flags, "-shared", "-fPIC", str(SOURCE), "-o", str(so), "-lm"],
                                  capture_output=True, text=True, timeout=300)
            if proc.returncode == 0:
                os.replace(so, out)  # atomic: a concurrent start sees the whole library or none
                return out
            errors.append(f"{cc} {' '.join(flags)}: {proc.stderr.strip()[-300:]}")
    raise RuntimeError("; ".join(errors))


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    P, I64, I32, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.dsc_linear.argtypes = [P, P, P, I32, I64, I64, P, P, I32]
    lib.dsc_swiglu.argtypes = [P, P, P, P, P, P, P, I32, P, P, I64, I64, I64, I64, I64, I64, I64, P, P, I32]
    lib.dsc_mla_decode.argtypes = [P, P, P, F32, P, P, P, P, I64, P, I64, I64, I64, I64, I64, F32, P, I32]
    lib.dsc_rmsnorm.argtypes = [P, P, F32, I64, P]
    lib.dsc_router.argtypes = [P, P, I64, I64, I64, I32, F32, P, P]
    for f in (lib.dsc_linear, lib.dsc_swiglu, lib.dsc_mla_decode, lib.dsc_rmsnorm, lib.dsc_router):
        f.restype = None
    lib.dsc_int8_fixed_point.argtypes, lib.dsc_int8_fixed_point.restype = [], ctypes.c_int
    return lib


def int8_linear_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, fixed_bits: int) -> torch.Tensor:
    """What ``dsc_linear`` computes for int8 weights in a build whose ``dsc_int8_fixed_point()`` is ``fixed_bits``
    (> 0), with plain PyTorch ops: ``x [1, K]`` (bf16) as fixed point ``v = round(x / s)``, ``s`` the power of two
    with ``max|x| < 2^fixed_bits * s``, ``|v| < 2^fixed_bits``; the exact integer products ``q v``; times ``s`` in
    float64, rounded to fp32, times the row's scale in fp32, rounded to bf16. ``q [N, K]`` int8, ``scale [N]`` bf16."""
    xf = x.float().reshape(-1)
    mx = xf.abs().max()
    e = int(torch.frexp(mx).exponent) if mx > 0 and torch.isfinite(mx) else 0
    s = 2.0 ** (e - fixed_bits)
    limit = 2 ** fixed_bits - 1
    v = torch.round(xf.double() / s).clamp(-limit, limit).long()
    dots = q.long() @ v  # exact
    return ((dots.double() * s).float() * scale.float()).to(torch.bfloat16).view(1, -1)


# ----- the decode step ----------------------------------------------------------------------------------------
# These run a few dozen times per token: they read modules' parameter and buffer dicts directly (nn.Module's
# __getattr__ and a function-level import cost a few percent of an int8 decode step).
def _plain_bf16(module) -> torch.Tensor | None:
    """The weight of a plain bias-free bf16 ``nn.Linear`` (not a LoRA or other subclass), contiguous; else None."""
    if type(module) is nn.Linear:
        params = module._parameters
        w = params["weight"]
        if params.get("bias") is None and w.dtype == torch.bfloat16 and w.is_contiguous():
            return w
    return None


_quant_types: tuple | None = None


def _int8(module):
    """``(qweight, scales)`` of an int8 QuantLinear / QuantWeight in the kernel layout with bf16 scales; else None."""
    global _quant_types
    if _quant_types is None:
        from dscoder.quant.modules import QuantLinear, QuantWeight

        _quant_types = (QuantLinear, QuantWeight)
    linear_type, weight_type = _quant_types
    w = module._modules["weight"] if isinstance(module, linear_type) else module
    if isinstance(w, weight_type) and w.layout == "int8":
        q, s = w._buffers["qweight"], w._buffers["scales"]
        if s.dtype == torch.bfloat16 and q.is_contiguous() and s.is_contiguous():
            return q, s
    return None


class DecodePlan:
    """One decode step of one sequence over a :class:`~dscoder.model.MLACache` row, through the native kernels.

    Built by :meth:`for_model` (None when the model or machine does not qualify); :meth:`step` takes what the
    model's forward takes for ``input_ids [1, 1]`` and returns the last position's logits ``[1, V]``."""

    def __init__(self, model, lib: ctypes.CDLL):
        self.model, self.lib = model, lib

    @classmethod
    def for_model(cls, model) -> DecodePlan | None:
        from dscoder.model.attention import MLA

        params = list(model.parameters())
        if not params or any(p.device.type != "cpu" for p in params):
            return None
        if any(p.is_floating_point() and p.dtype != torch.bfloat16 for p in params):
            return None  # the kernels take bf16 activations: float32 models keep their plain forward
        if model.config.num_experts_per_tok > MAX_EXPERTS_PER_TOKEN:
            return None
        for layer in model.model.layers:
            attn = layer.self_attn
            if type(attn) is not MLA or _plain_bf16(attn.kv_b_proj) is None:
                return None
        lib = library()
        return cls(model, lib) if lib is not None else None

    # --- products ---
    def linear(self, module, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """``module(x)`` for one row ``x [1, K]`` (bf16, contiguous): native for plain bf16 and int8 weights.
        With ``add``: ``add + module(x)``, written into ``add``."""
        w, s, wtype = _plain_bf16(module), None, 0
        if w is None:
            q = _int8(module)
            if q is None:
                return module(x) if add is None else add.add_(module(x))
            (w, s), wtype = q, 1
        y = torch.empty(1, w.shape[0], dtype=torch.bfloat16) if add is None else add
        self.lib.dsc_linear(x.data_ptr(), w.data_ptr(), None if s is None else s.data_ptr(), wtype, w.shape[0],
                            w.shape[1], y.data_ptr(), None if add is None else add.data_ptr(), self.nt)
        return y

    def norm(self, module, x: torch.Tensor) -> torch.Tensor:
        from dscoder.model.norm import RMSNorm

        if type(module) is RMSNorm and module.weight.dtype == torch.bfloat16:
            y = torch.empty_like(x)
            self.lib.dsc_rmsnorm(x.data_ptr(), module.weight.data_ptr(), module.eps, x.shape[-1], y.data_ptr())
            return y
        return module(x).contiguous()

    def route(self, gate, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights [1, K] fp32, experts [1, K])`` of the router for one token."""
        from dscoder.model.moe import Gate

        if type(gate) is Gate and gate.method == "greedy" and gate.weight.dtype == torch.bfloat16 \
                and gate.n_experts <= MAX_ROUTED_EXPERTS:
            ids = torch.empty(1, gate.top_k, dtype=torch.long)
            weights = torch.empty(1, gate.top_k, dtype=torch.float32)
            self.lib.dsc_router(x.data_ptr(), gate.weight.data_ptr(), gate.n_experts, x.shape[-1], gate.top_k,
                                int(gate.norm_topk_prob), gate.scaling, ids.data_ptr(), weights.data_ptr())
            return weights, ids
        weights, ids, _ = gate(x)
        return weights, ids

    def _swiglu(self, x, acc, gate, up, down, gate_s, up_s, down_s, wtype, ids, coef, nk, D, I, gu_stride,
                d_stride, gus_stride, ds_stride, res) -> None:
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        self.lib.dsc_swiglu(x.data_ptr(), gate, up, down, gate_s, up_s, down_s, wtype, ptr(ids), ptr(coef), nk, D, I,
                            gu_stride, d_stride, gus_stride, ds_stride, acc.data_ptr(), ptr(res), self.nt)

    def mlp(self, module, x: torch.Tensor, acc: torch.Tensor, res: torch.Tensor | None = None) -> None:
        """``acc [1, D] (fp32) += module(x)`` for a SwiGLU :class:`~dscoder.model.moe.MLP`; then, with ``res``
        (bf16 [1, D]), ``res += acc`` (the layer's residual connection)."""
        from dscoder.model.moe import MLP

        D = x.shape[-1]
        if type(module) is MLP:
            ws = [_plain_bf16(m) for m in (module.gate_proj, module.up_proj, module.down_proj)]
            if all(w is not None for w in ws):
                g, u, d = ws
                self._swiglu(x, acc, g.data_ptr(), u.data_ptr(), d.data_ptr(), None, None, None, 0, None, None, 1, D,
                             g.shape[0], 0, 0, 0, 0, res)
                return
            qs = [_int8(m) for m in (module.gate_proj, module.up_proj, module.down_proj)]
            if all(q is not None for q in qs):
                (g, gs), (u, us), (d, ds) = qs
                self._swiglu(x, acc, g.data_ptr(), u.data_ptr(), d.data_ptr(), gs.data_ptr(), us.data_ptr(),
                             ds.data_ptr(), 1, None, None, 1, D, g.shape[0], 0, 0, 0, 0, res)
                return
        acc += module(x).float()
        if res is not None:
            res.add_(acc.to(res.dtype))

    def experts(self, module, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, acc: torch.Tensor) -> None:
        """``acc [1, D] += module(x, weights, ids)`` for the routed experts (one token, K chosen)."""
        from dscoder.model.moe import RoutedExperts
        from dscoder.quant.modules import QuantExperts

        D, K = x.shape[-1], ids.shape[-1]
        ids, coef = ids.reshape(-1).contiguous(), weights.reshape(-1).float().contiguous()
        if type(module) is RoutedExperts and module.gate_up_proj.dtype == torch.bfloat16 \
                and module.gate_up_proj.is_contiguous() and module.down_proj.is_contiguous():
            gu, dn = module.gate_up_proj, module.down_proj
            I = module.intermediate
            base = gu.data_ptr()
            self._swiglu(x, acc, base, base + I * D * 2, dn.data_ptr(), None, None, None, 0, ids, coef, K, D, I,
                         2 * I * D, D * I, 0, 0, None)
            return
        if type(module) is QuantExperts:
            gq, dq = _int8(module.gate_up_proj), _int8(module.down_proj)
            if gq is not None and dq is not None:
                I = module.intermediate
                (g, gs), (d, ds) = gq, dq
                self._swiglu(x, acc, g.data_ptr(), g.data_ptr() + I * D, d.data_ptr(), gs.data_ptr(),
                             gs.data_ptr() + I * 2, ds.data_ptr(), 1, ids, coef, K, D, I, 2 * I * D, D * I, 2 * I, D,
                             None)
                return
        acc += module(x, weights, ids.view(1, K)).float()

    # --- attention ---
    def attention(self, attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_LBSE: torch.Tensor,
                  start_pos: int, mask: torch.Tensor | None, h: torch.Tensor) -> None:
        """``h += attn(x)`` for one token, its cache entries written at ``start_pos``."""
        if hasattr(attn, "q_proj"):
            q = self.linear(attn.q_proj, x)
        else:
            q = self.linear(attn.q_b_proj, self.norm(attn.q_a_layernorm, self.linear(attn.q_a_proj, x)))
        kv = self.linear(attn.kv_a_proj_with_mqa, x)
        layer = kv_LBSE[attn.layer_idx, 0]
        H, V = attn.n_heads, attn.v_dim
        out = torch.empty(1, H * V, dtype=torch.bfloat16)
        ln = attn.kv_a_layernorm
        self.lib.dsc_mla_decode(q.data_ptr(), kv.data_ptr(), ln.weight.data_ptr(), ln.eps, cos.data_ptr(),
                                sin.data_ptr(), attn.kv_b_proj.weight.data_ptr(), layer.data_ptr(), start_pos,
                                None if mask is None else mask.data_ptr(), H, attn.nope_dim, attn.rope_dim, V,
                                attn.kv_lora_rank, attn.softmax_scale, out.data_ptr(), self.nt)
        self.linear(attn.o_proj, out, add=h)

    def usable(self, input_ids, attention_mask, cache, start_pos) -> bool:
        """Whether :meth:`step` takes this call (else the caller runs the model's forward)."""
        if cache is None or input_ids.shape != (1, 1):
            return False
        kv = cache.kv
        if kv.shape[1] != 1 or kv.dtype != torch.bfloat16 or kv.stride(3) != 1 or kv.stride(2) != kv.shape[3] \
                or start_pos >= kv.shape[2]:
            return False
        if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.dtype != torch.bool
                                           or attention_mask.shape[1] != start_pos + 1
                                           or attention_mask.stride(1) != 1):
            return False
        return True

    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
             cache, start_pos: int) -> torch.Tensor:
        """Logits ``[1, V]`` of ``input_ids [1, 1]`` at cache position ``start_pos`` (its entries written there);
        ``attention_mask [1, start_pos + 1]`` bool marks the cache entries this row attends to (None: all)."""
        model = self.model
        self.nt = torch.get_num_threads()
        if position_ids is None:
            position_ids = torch.full((1, 1), start_pos, dtype=torch.long)
        cos, sin = model.model.rotary(position_ids)
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        h = F.embedding(input_ids.view(1), model.model.embed_tokens.weight)  # [1, D], the residual stream
        for layer in model.model.layers:
            self.attention(layer.self_attn, self.norm(layer.input_layernorm, h), cos, sin, cache.kv, start_pos,
                           attention_mask, h)
            x = self.norm(layer.post_attention_layernorm, h)
            acc = torch.zeros(x.shape, dtype=torch.float32)
            mlp = layer.mlp
            if layer.is_moe:
                weights, ids = self.route(mlp.gate, x)
                if mlp.shared_experts is None:
                    self.experts(mlp.experts, x, weights, ids, acc)
                    h.add_(acc.to(h.dtype))
                else:
                    self.experts(mlp.experts, x, weights, ids, acc)
                    self.mlp(mlp.shared_experts, x, acc, res=h)
            else:
                self.mlp(mlp, x, acc, res=h)
        return self.linear(model.lm_head, self.norm(model.model.norm, h))
