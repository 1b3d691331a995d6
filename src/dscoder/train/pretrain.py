"""The pre-training loop: one process or ``torchrun``, DDP or FSDP2, next-token loss over FIM'd packed batches plus
the MoE balance loss, AdamW with warmup + cosine, gradient accumulation and clipping, metrics, DCP checkpoints.

Run it with ``dscoder train pretrain --config configs/tiny.toml --out RUN [key=value ...]``; under
``torchrun --nproc_per_node=N`` the same command trains data-parallel (``parallel.strategy = "ddp" | "fsdp"``),
with the routed experts spread over ``parallel.ep`` ranks when it is > 1 (``dscoder.train.expert_parallel``).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dscoder.config import ModelConfig
from dscoder.errors import ConfigError, DscoderError
from dscoder.io import read_jsonl
from dscoder.train import expert_parallel
from dscoder.train.config import Stage, TrainConfig
from dscoder.train.optim import lr_factor, optimizer_for
from dscoder.train.run import (Run, autocast, build_model, check_context, model_config, optimizer_step,
                               unwrap)


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """torchrun's environment → process group (NCCL on GPU, gloo on CPU); a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        PROCESS_GROUPS.append(dist.group.WORLD)
    return Dist(rank, world, local_rank, device)


# The default process group of a torchrun rank, held until the process ends (``dscoder.cli.main`` then leaves with
# ``os._exit``): freed with the model instead, gloo's destructor joined its worker thread while holding the GIL,
# and that thread waited for the GIL to free a finished collective's tensors (a GRPO rank hung after its run).
PROCESS_GROUPS: list = []


# ----- model -----------------------------------------------------------------------------------------------------
def parallelize(model: torch.nn.Module, config: TrainConfig, d: Dist) -> torch.nn.Module:
    strategy = config.parallel.strategy if d.world > 1 else "none"
    ep = config.parallel.ep
    mesh = None
    if ep > 1:  # each rank keeps E/ep routed experts; the rest of the model stays data-parallel over all ranks
        from dscoder.train.expert_parallel import apply_expert_parallel, build_mesh

        mesh = build_mesh(d.device.type, d.world, ep, model.config.n_routed_experts)
        apply_expert_parallel(model, mesh)
    if config.train.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        layers = model.model.layers
        for i, layer in enumerate(layers):
            layers[i] = checkpoint_wrapper(layer)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        if ep > 1:  # expert gradients are reduced by expert_parallel.reduce_expert_grads instead
            from dscoder.train.expert_parallel import expert_parameter_names

            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_parameter_names(model))
        model = DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    elif strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if ep > 1:  # FSDP2 + EP: the experts stay EP-sharded (their gradients reduced by reduce_expert_grads);
            # everything else is sharded over "dp" and replicated over "ep" (expert_parallel.hsdp_mesh)
            fsdp_mesh, ignored = expert_parallel.hsdp_mesh(mesh), expert_parallel.expert_parameters(model)
        else:
            fsdp_mesh, ignored = init_device_mesh(d.device.type, (d.world,)), None
        for layer in model.model.layers:
            inner = getattr(layer, "_checkpoint_wrapped_module", layer)
            if inner.is_moe and ep == 1:
                fully_shard(inner.mlp.experts, mesh=fsdp_mesh)  # the routed experts are their own unit
            fully_shard(layer, mesh=fsdp_mesh, ignored_params=ignored)
        fully_shard(model, mesh=fsdp_mesh, ignored_params=ignored)
    if config.train.compile:
        model = torch.compile(model)
    return model


# ----- data ------------------------------------------------------------------------------------------------------
def data_sources(config: TrainConfig, anneal: bool = False) -> list[tuple[str, float, int]]:
    """The builds a loader reads, as ``(path, weight, min_tokens)``: the run's, or with ``anneal`` its anneal's
    (``data.anneal_path``). Every build must have been made with the same tokenizer (the anneal's is checked too)."""
    if config.data.path:
        sources = [(config.data.path, 1.0, 0)]
    else:
        sources = [(s["path"], float(s.get("weight", 1.0)), int(s.get("min_tokens", 0))) for s in config.data.sources]
    checked = sources + ([(config.data.anneal_path, 1.0, 0)] if config.data.anneal_path else [])
    for path, *_ in checked:
        p = Path(path)
        if not (p / "tokens").is_dir() or not (p / "tokenizer").is_dir():
            raise DscoderError(f"{path}: not a `dscoder data build` output (needs tokens/ and tokenizer/)")
    vocab = [_tokenizer_file(Path(path)) for path, *_ in checked]
    for (path, *_), v in zip(checked[1:], vocab[1:]):
        if v != vocab[0]:  # the ids of one build would mean other strings to the model
            raise DscoderError(f"{path}: made with another tokenizer than {checked[0][0]}; build every source of a "
                               "mixture and the anneal with the same one (dscoder data build --tokenizer DIR)")
    return checked[-1:] if anneal else sources


def _tokenizer_file(build: Path) -> bytes | None:
    try:
        return (build / "tokenizer" / "tokenizer.json").read_bytes()
    except OSError:
        return None


def source_names(config: TrainConfig, anneal: bool = False) -> list[str]:
    """The names a run logs each data source's token share under: ``name``, else the build folder's name (made
    unique by its position when two sources share one)."""
    if anneal:
        return [Path(config.data.anneal_path).name or "anneal"]
    if config.data.path:
        return [Path(config.data.path).name or "data"]
    names = [s.get("name") or Path(s["path"]).name or f"source{i}" for i, s in enumerate(config.data.sources)]
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def make_loader(config: TrainConfig, stage: Stage, tokenizer, d: Dist, anneal: bool = False):
    from dscoder.data.loader import PackedLoader

    micro = stage.micro_batch or config.train.micro_batch
    rows = config.data.shard == "rows"
    return PackedLoader(data_sources(config, anneal), tokenizer, seq_len=stage.seq_len,
                        batch_size=micro * d.world if rows else micro, rank=0 if rows else d.rank,
                        world_size=1 if rows else d.world, seed=config.train.seed, fim_rate=config.data.fim_rate,
                        spm_rate=config.data.spm_rate, shuffle_rows=config.data.shuffle_rows)


def _next_batch(loader, config: TrainConfig, stage: Stage, d: Dist) -> tuple[torch.Tensor, torch.Tensor]:
    batch = next(loader)
    ids, labels = batch["input_ids"], batch["labels"]
    if config.data.shard == "rows":
        micro = stage.micro_batch or config.train.micro_batch
        ids, labels = ids[d.rank * micro:(d.rank + 1) * micro], labels[d.rank * micro:(d.rank + 1) * micro]
    return ids.to(d.device, non_blocking=True), labels.to(d.device, non_blocking=True)


# ----- the loop --------------------------------------------------------------------------------------------------
def _stage_at(plan: list[Stage], step: int) -> tuple[int, int]:
    """(stage index, first step of that stage) for a global optimizer step."""
    start = 0
    for i, s in enumerate(plan):
        if step < start + s.steps:
            return i, start
        start += s.steps
    return len(plan) - 1, start - plan[-1].steps


def _config_at(mcfg: ModelConfig, plan: list[Stage], step: int) -> ModelConfig:
    """The model config in effect after ``step`` optimizer steps (stages may have changed the YaRN factor)."""
    stage = plan[_stage_at(plan, max(step - 1, 0))[0]]
    if stage.rope_factor is None or mcfg.yarn is None:
        return mcfg
    return mcfg.with_rope_factor(stage.rope_factor)


def _apply_stage_rope(model, stage: Stage, base: ModelConfig) -> None:
    if stage.rope_factor is None:
        return
    if base.rope_scaling is None or base.rope_scaling["type"] != "yarn":
        raise ConfigError("stages[].rope_factor needs a model with YaRN rope_scaling")
    unwrap(model).set_rope_factor(stage.rope_factor)


def _peak_flops(device: torch.device, dtype: str) -> tuple[float, str]:
    """The denominator of MFU: the GPU's dense bf16 peak, or on CPU a measured matmul rate in the training dtype
    (``train.dtype``: bf16 matmuls run about 4x faster than fp32 on a CPU with AVX512-BF16)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in (("H200", 989), ("H100", 989), ("A100", 312), ("L40", 181), ("A10", 125), ("4090", 165)):
            if key in name:
                return tflops * 1e12, f"{name} bf16 peak"
        return float("nan"), name
    bf16 = dtype == "bfloat16"
    a = torch.randn(1024, 1024, dtype=torch.bfloat16 if bf16 else torch.float32)
    a @ a
    t0 = time.perf_counter()
    for _ in range(8):
        a @ a
    return 8 * 2 * 1024**3 / (time.perf_counter() - t0), f"measured CPU {'bf16' if bf16 else 'fp32'} matmul rate"


def _expert_load(counts_LE: torch.Tensor | None) -> float | None:
    """Mean over MoE layers of (busiest expert's tokens / mean tokens per expert), from a training forward's
    ``expert_counts [L_moe, E]`` (the last micro-batch's)."""
    if counts_LE is None:
        return None
    return float((counts_LE.amax(-1) / counts_LE.mean(-1).clamp(min=1e-9)).mean())


def _all_mean(values: list[float], d: Dist) -> list[float]:
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return (t / d.world).tolist()


def pretrain(config: TrainConfig, out: str | Path, resume: bool = False, max_steps: int | None = None) -> dict[str, Any]:
    """Train (or resume) a run in ``out``; returns the last step's metrics. ``max_steps`` stops early (as a kill
    would), for tests and for splitting a run across jobs."""
    from dscoder.tokenizer import Tokenizer

    d = setup_distributed()
    if d.world > 1 and config.parallel.strategy == "none":  # under torchrun, ranks that train alone were never meant
        config.parallel.strategy = "ddp"
    out = Path(out)
    sources = data_sources(config)
    tokenizer = Tokenizer.load(Path(sources[0][0]) / "tokenizer")
    mcfg = model_config(config.model, tokenizer)
    plan = config.stage_plan()
    for i, s in enumerate(plan):  # each stage's length against the context in effect during it
        check_context(s.seq_len, _config_at(mcfg, plan, sum(p.steps for p in plan[:i]) + 1),
                      f"stages[{i}].seq_len" if config.stages else "data.seq_len")
    expert_parallel.check(config.parallel.ep, d.world, mcfg.n_routed_experts)
    run = Run(out, main=d.main)
    run.start(config.to_dict(), resume, tokenizer)
    model = build_model(config.model, mcfg, config.train.seed, d.device)
    model = parallelize(model, config, d)
    t = config.train
    optimizer = optimizer_for(model, t)
    # the checkpoint must hold the model config in effect at its step (a stage may have changed the YaRN factor)
    extra = run.restore(model, optimizer, resume,
                        expected=lambda meta: _config_at(mcfg, plan, meta.get("step", 0)).to_hf_dict())
    start, loader_state = (extra["step"], extra["loader"]) if extra else (0, None)
    total = config.total_steps
    stop = total if max_steps is None else min(total, max_steps)
    stage_idx, stage_start = _stage_at(plan, start)
    stage = plan[stage_idx]
    _apply_stage_rope(model, stage, mcfg)
    anneal_at = config.anneal_start
    annealing = anneal_at is not None and start >= anneal_at
    loader = make_loader(config, stage, tokenizer, d, anneal=annealing)
    if loader_state is not None:
        saved_annealing = bool(extra.get("anneal", False))
        if saved_annealing and not annealing:
            raise DscoderError(f"step {start}: the checkpoint was saved during the anneal, which this recipe starts "
                               f"at step {anneal_at}; resume with the steps and data.anneal_fraction it was saved "
                               "under")
        if saved_annealing == annealing:  # (saved before the anneal, resumed in it: the anneal starts here)
            loader.load_state_dict(loader_state)
    names = source_names(config, annealing)
    peak, peak_name = _peak_flops(d.device, t.dtype)
    flops_per_token = unwrap(model).flops_per_token(stage.seq_len)
    last: dict[str, Any] = {}
    step = start
    with run.progress("pretrain", total, start) as bar:
        while step < stop:
            idx, first = _stage_at(plan, step)
            if idx != stage_idx:  # long-context extension: next stage's length, batch and YaRN factor
                stage_idx, stage_start, stage = idx, first, plan[idx]
                _apply_stage_rope(model, stage, mcfg)
                position = loader.stream_state()  # the data stream continues; only row length and batch change
                loader = make_loader(config, stage, tokenizer, d, anneal=annealing)
                loader.load_state_dict(position)
                flops_per_token = unwrap(model).flops_per_token(stage.seq_len)
            if anneal_at is not None and not annealing and step >= anneal_at:  # the anneal's build from here on
                annealing = True
                loader = make_loader(config, stage, tokenizer, d, anneal=True)
                names = source_names(config, anneal=True)
            t0 = time.perf_counter()
            lm_sum, aux_sum, tokens = 0.0, 0.0, 0
            for micro in range(t.grad_accum):
                ids, labels = _next_batch(loader, config, stage, d)
                sync = micro == t.grad_accum - 1
                with _no_sync(model, config, sync, d), autocast(t.dtype, d.device):
                    output = model(ids)
                    lm = F.cross_entropy(output.logits.float().flatten(0, 1), labels.flatten())
                    aux = output.aux_loss if output.aux_loss is not None else torch.zeros((), device=d.device)
                    ((lm + aux) / t.grad_accum).backward()
                lm_sum += lm.item()
                aux_sum += float(aux.detach())
                tokens += ids.numel()
            lr = (stage.lr or t.lr) * (lr_factor(step - stage_start, min(t.warmup_steps, stage.steps // 2 or 1),
                                                 stage.steps, t.min_lr_ratio) if config.stages else
                                       lr_factor(step, t.warmup_steps, total, t.min_lr_ratio))
            # losses averaged over ranks and the global gradient norm: every rank stops at the same step
            lm_loss, aux_loss = _all_mean([lm_sum / t.grad_accum, aux_sum / t.grad_accum], d)
            grad_norm = optimizer_step(model, optimizer, lr, t.grad_clip, step + 1,
                                       clip=_expert_parallel_clip if config.parallel.ep > 1 else None,
                                       loss=lm_loss, aux_loss=aux_loss)
            step += 1
            if d.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            tok_s = tokens * d.world / seconds
            last = {"step": step, "loss": lm_loss, "aux_loss": aux_loss, "grad_norm": grad_norm, "lr": lr,
                    "tokens_per_s": tok_s, "mfu": flops_per_token * tok_s / peak, "seq_len": stage.seq_len,
                    "expert_load_max": _expert_load(output.expert_counts)}
            if len(names) > 1:  # the mixture as received: each source's share of the label tokens so far (this rank's)
                last["data_shares"] = {n: round(v, 6) for n, v in zip(names, loader.token_shares())}
            if anneal_at is not None:
                last["anneal"] = annealing
            bar.update(loss=lm_loss, tok_s=round(tok_s))
            run.end_step(step, stop, t, last, model, optimizer,
                         extra={"loader": loader.state_dict(), "anneal": annealing}, meta={"peak_flops": peak_name})
    if d.main and run.metrics.exists():
        plot_loss(run.metrics, out / "loss.png")
    return last


def _expert_parallel_clip(model, max_norm: float) -> torch.Tensor:
    """Expert gradients reduced over "dp", then clipped with the global norm (``dscoder.train.expert_parallel``)."""
    expert_parallel.reduce_expert_grads(model)
    return expert_parallel.clip_grad_norm_(model, max_norm)


def _no_sync(model, config: TrainConfig, sync: bool, d: Dist):
    return grad_sync(model, sync or d.world == 1)


def grad_sync(model, sync: bool):
    """The context of a backward pass that exchanges gradients (``sync``) or only accumulates them (DDP's
    ``no_sync``, FSDP2's ``set_requires_gradient_sync(False)``); nothing to do for a plain model."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        @contextlib.contextmanager
        def fsdp_no_sync():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return fsdp_no_sync()
    return contextlib.nullcontext()


def plot_loss(metrics_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for _, row in read_jsonl(metrics_path, "metrics", allow_empty=True)]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in rows], label="LM loss")
    if any(r.get("aux_loss") for r in rows):
        ax2 = ax.twinx()
        ax2.plot(steps, [r["aux_loss"] for r in rows], color="#dd8452", alpha=0.6, label="balance loss")
        ax2.set_ylabel("balance loss")
    ax.set_xlabel("step")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title(f"pre-training: {rows[-1]['loss']:.3f} at step {steps[-1]}")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
