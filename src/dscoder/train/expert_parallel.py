"""Expert parallelism (EP) for training, applied from outside the single-device model.

``parallel.ep = N`` builds a 2-D DeviceMesh ``("dp", "ep") = (world / N, N)``; rank ``r`` sits at
``(r // N, r % N)``, so an EP group is N consecutive ranks. :func:`apply_expert_parallel` replaces every MoE layer's
``mlp.experts`` by :class:`ExpertParallelExperts`, which keeps only this EP rank's ``E / N`` consecutive experts as
DTensors sharded ``Shard(0)`` over the "ep" sub-mesh (global shapes ``[E, 2I, D]`` and ``[E, D, I]``, the names of
:class:`~dscoder.model.moe.RoutedExperts`), so DCP saves every rank's experts under the usual keys and a single
process (``dscoder export``) reads them back as full tensors.

Forward of one MoE layer (per EP group; the gate and shared experts run locally as before):

1. sort the ``S = N·K`` (token, expert) slots by expert, as the single-device path does; append each slot's routing
   weight to its row (``[S, D + 1]``) so one exchange carries both;
2. exchange per-expert slot counts (``all_to_all_single`` of ``[E]`` ints) and bring the split sizes to the host:
   the one host sync per layer, inherent to EP (backward reuses the same split sizes);
3. ``all_to_all`` the rows to the ranks owning their experts; the received rows come grouped by source rank, each
   group sorted by expert, so a stable sort by local expert makes them contiguous per expert;
4. :func:`~dscoder.model.moe.expert_swiglu` (the single-device grouped matmuls, weight applied before
   ``down_proj``) with the local expert weights;
5. undo the local sort, ``all_to_all`` the outputs back, undo the slot sort and sum each token's K outputs.
The exchanges are autograd-aware (``_functional_collectives.all_to_all_single_autograd``, the non-deprecated
successor of ``torch.distributed.nn.functional.all_to_all_single``): backward runs the reverse exchanges.

Gradients. Each rank's loss ``L_r`` is a mean over its own tokens and the target is the single-process mean over
the global batch, ``(1/W) Σ_r ∇L_r`` (equal token counts per rank, as DDP assumes). Non-expert parameters get
``∇L_r`` on rank r and DDP averages them over the whole world (the expert parameters are excluded from DDP). An
expert weight lives on one EP rank per "dp" replica, and backward through the exchanges already sums onto it the
gradients of all ``L_r`` of its EP group; :func:`reduce_expert_grads` divides by W and sums over "dp", which gives
``(1/W) Σ_{all r} ∇L_r`` as well. With gradient accumulation it runs once, after the last micro-batch.

Clipping. ``clip_grad_norm_`` adds the squared norms of the replicated gradients and of the expert shards (summed
over "ep"), so every rank clips with the global norm, as ``torch.nn.utils.clip_grad_norm_`` does in one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from dscoder.errors import ConfigError
from dscoder.model.moe import RoutedExperts, expert_swiglu


def check(ep: int, world: int, n_routed_experts: int | None) -> None:
    """One-line ConfigErrors when ``ep`` does not fit the number of processes or the model."""
    if ep == 1:
        return
    if world == 1:
        raise ConfigError(f"parallel.ep = {ep}: expert parallelism needs torchrun with a multiple of {ep} "
                          "processes (this is a single process)")
    if world % ep:
        raise ConfigError(f"parallel.ep = {ep}: must divide the number of processes ({world})")
    if not n_routed_experts:
        raise ConfigError(f"parallel.ep = {ep}: the model has no routed experts")
    if n_routed_experts % ep:
        raise ConfigError(f"parallel.ep = {ep}: must divide the model's n_routed_experts ({n_routed_experts})")


def build_mesh(device_type: str, world: int, ep: int, n_routed_experts: int | None) -> DeviceMesh:
    """The ("dp", "ep") mesh, after :func:`check`."""
    check(ep, world, n_routed_experts)
    return init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("dp", "ep"))


class ExpertParallelExperts(nn.Module):
    """This EP rank's share of a layer's routed experts; same call signature as ``RoutedExperts``.

    ``gate_up_proj`` and ``down_proj`` are DTensors of the global shapes, sharded ``Shard(0)`` over the "ep" mesh;
    the forward exchanges slots with the other EP ranks (see the module docstring).
    """

    def __init__(self, experts: RoutedExperts, mesh: DeviceMesh):
        super().__init__()
        ep_mesh = mesh["ep"]
        self.mesh, self.group = mesh, ep_mesh.get_group()
        self.n_experts, self.ep = experts.n_experts, ep_mesh.size()
        self.n_local = self.n_experts // self.ep
        first = ep_mesh.get_local_rank() * self.n_local
        local = slice(first, first + self.n_local)
        self.gate_up_proj = nn.Parameter(DTensor.from_local(experts.gate_up_proj.detach()[local].clone(), ep_mesh,
                                                            [Shard(0)], run_check=False))
        self.down_proj = nn.Parameter(DTensor.from_local(experts.down_proj.detach()[local].clone(), ep_mesh,
                                                         [Shard(0)], run_check=False))

    def forward(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor) -> torch.Tensor:
        N, K = experts_NK.shape
        D = x_ND.shape[1]
        flat_S = experts_NK.reshape(-1)
        order_S = torch.argsort(flat_S, stable=True)
        weight_S = weights_NK.reshape(-1)[order_S].to(x_ND.dtype)
        send_SD1 = torch.cat([x_ND[order_S // K], weight_S[:, None]], dim=1)

        counts_E = torch.bincount(flat_S, minlength=self.n_experts)
        recv_counts = torch.empty_like(counts_E)  # [source rank, local expert], flattened
        dist.all_to_all_single(recv_counts, counts_E, group=self.group)
        send_splits, recv_splits = torch.stack([counts_E.view(self.ep, self.n_local).sum(1),
                                                recv_counts.view(self.ep, self.n_local).sum(1)]).tolist()
        recv_RD1 = all_to_all_single_autograd(send_SD1, recv_splits, send_splits, self.group)

        local_R = torch.repeat_interleave(torch.arange(self.n_local, device=x_ND.device).repeat(self.ep),
                                          recv_counts, output_size=sum(recv_splits))
        order_R = torch.argsort(local_R, stable=True)
        # (gathering the columns apart gives contiguous rows, as _grouped_mm needs 16-byte-aligned strides)
        y_RD = expert_swiglu(recv_RD1[:, :D][order_R], recv_RD1[:, D][order_R], local_R[order_R],
                             self.gate_up_proj.to_local(), self.down_proj.to_local())
        y_back = torch.empty_like(y_RD).index_copy_(0, order_R, y_RD)
        y_SD = all_to_all_single_autograd(y_back, send_splits, recv_splits, self.group)
        # Undo the sort and add each token's K expert outputs, as RoutedExperts does.
        y_unsorted = torch.empty_like(y_SD).index_copy_(0, order_S, y_SD)
        return y_unsorted.view(N, K, -1).sum(dim=1)


def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Replace every MoE layer's routed experts by this rank's EP share (in place; call before wrapping)."""
    for layer in model.model.layers:
        layer = getattr(layer, "_checkpoint_wrapped_module", layer)
        if layer.is_moe and isinstance(layer.mlp.experts, RoutedExperts):
            layer.mlp.experts = ExpertParallelExperts(layer.mlp.experts, mesh)
    return model


def _ep_modules(model: nn.Module) -> list[ExpertParallelExperts]:
    return [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]


def expert_parameter_names(model: nn.Module) -> list[str]:
    """The expert parameters' names in both spellings DDP uses (``named_parameters`` and module path + name;
    they differ under activation-checkpointing wrappers), for ``_set_params_and_buffers_to_ignore_for_model``."""
    names = {n for n, p in model.named_parameters() if isinstance(p, DTensor)}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(p, DTensor):
                names.add(f"{module_name}.{name}" if module_name else name)
    return sorted(names)


@torch.no_grad()
def reduce_expert_grads(model: nn.Module) -> None:
    """Turn the accumulated expert gradients into those of the global mean loss: divide by the world size and sum
    over "dp" (one all-reduce of all expert gradients together). Collective: every rank calls it."""
    modules = _ep_modules(model)
    if not modules:
        return
    mesh = modules[0].mesh
    world = mesh.size()
    grads = []
    for m in modules:
        for p in (m.gate_up_proj, m.down_proj):
            if p.grad is None:  # keeps the collective the same on every rank
                p.grad = DTensor.from_local(torch.zeros_like(p.to_local()), p.device_mesh, p.placements,
                                            run_check=False)
            grads.append(p.grad.to_local())
    if mesh["dp"].size() == 1:
        torch._foreach_div_(grads, world)
        return
    flat = torch.cat([g.reshape(-1) for g in grads]).div_(world)
    dist.all_reduce(flat, group=mesh["dp"].get_group())
    torch._foreach_copy_(grads, [t.view_as(g) for t, g in zip(flat.split([g.numel() for g in grads]), grads)])


def hsdp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP2 shards the non-expert weights over under EP: the same ranks as ``mesh`` ("dp", "ep") with
    the dimensions swapped, ("ep_replicate", "dp_shard"), since FSDP2 given a 2-D mesh replicates over the first
    dimension and shards over the second (HSDP): each weight is sharded over "dp" and replicated over "ep", and its
    gradient is reduce-scattered over "dp" and all-reduced over "ep", i.e. averaged over the whole world."""
    from torch.distributed.device_mesh import DeviceMesh as Mesh

    return Mesh(mesh.device_type, mesh.mesh.t().contiguous(), mesh_dim_names=("ep_replicate", "dp_shard"))


def expert_parameters(model: nn.Module) -> set[nn.Parameter]:
    """The EP-sharded expert weights (what FSDP2 leaves alone: ``fully_shard(..., ignored_params=...)``)."""
    return {p for m in _ep_modules(model) for p in (m.gate_up_proj, m.down_proj)}


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over plain (DDP-replicated) gradients and DTensor gradients on any mesh
    (the EP-sharded experts; FSDP2's shards under FSDP2 + EP): the global 2-norm, each mesh's shards summed by
    DTensor, the same clip coefficient on every rank."""
    groups: dict[int, list[torch.Tensor]] = {}
    for p in model.parameters():
        if p.grad is not None:
            mesh = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            groups.setdefault(id(mesh), []).append(p.grad)
    squares = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.float().square())
    total = torch.stack(squares).sum().sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    local = [g.to_local() if isinstance(g, DTensor) else g for grads in groups.values() for g in grads]
    torch._foreach_mul_(local, coef.to(local[0].device))
    return total
