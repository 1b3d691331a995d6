"""AdamW with the paper's settings and the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on norms, biases or other 1-D parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float = 1e-8) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)


def optimizer_for(model: torch.nn.Module, t) -> torch.optim.AdamW:
    """The AdamW of a ``[train]`` section ``t`` (lr, weight_decay, beta1, beta2, eps): one place for every loop."""
    return build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak rate at optimizer step ``step`` (0-based): linear warmup from 1/warmup to 1 over
    ``warmup`` steps, then cosine decay to ``min_ratio`` at the last step (DeepSeek-Coder-V2: 2000 steps, 10%)."""
    if step < warmup:
        return (step + 1) / warmup
    decay_steps = max(total - warmup - 1, 1)
    progress = min((step - warmup) / decay_steps, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
