"""LoRA (Hu et al. 2021) for fine-tuning: the base weights frozen, a low-rank update ``scaling * B A`` trained.

Shape legend: D in features, O out features, r rank, E routed experts, I expert intermediate size.

A targeted ``nn.Linear`` becomes a :class:`LoRALinear` holding the same weight tensor plus ``lora_A [r, D]`` and
``lora_B [O, r]``: ``y = W x + scaling * B A dropout(x)``, ``scaling = alpha / r``, A drawn as ``nn.Linear`` draws
(Kaiming-uniform) and B zero, so training starts from the base model exactly (PEFT's default initialisation).
With ``lora.experts = true`` the routed experts' stacked ``gate_up_proj [E, 2I, D]`` / ``down_proj [E, D, I]``
take stacked factors (:class:`LoRAExperts`); their grouped matmuls run on ``W + scaling * B A`` per expert (no
dropout there: the input cannot be factored out of the merged weight, as in PEFT's parameter targets).

The adapter is written in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``, keys
``base_model.model.<hub module name>.lora_A.weight``; routed experts per expert as the hub names them,
``mlp.experts.{e}.gate_proj``), so ``peft.PeftModel.from_pretrained`` loads it onto transformers'
``DeepseekV2ForCausalLM``; :func:`merge_lora` folds the update into the weights for an ordinary HF export.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dscoder.errors import ConfigError
from dscoder.model.moe import RoutedExperts

ATTENTION_TARGETS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ADAPTER_DIR = "adapter"


@dataclass
class LoRASection:
    """The recipe's ``[lora]`` table; ``rank = 0`` (the default) trains the full model."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(ATTENTION_TARGETS))
    experts: bool = False  # also the routed experts (needs gate_proj / up_proj / down_proj in targets)
    seed: int = 0  # the adapter's initial A matrices

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def validate(self, source: str = "config") -> None:
        if self.rank < 0:
            raise ConfigError(f"{source}: lora.rank = {self.rank}: expected a positive rank (0 turns LoRA off)")
        if not self.enabled:
            return
        if not (0.0 <= self.dropout < 1.0):
            raise ConfigError(f"{source}: lora.dropout = {self.dropout}: expected 0 <= dropout < 1")
        if isinstance(self.targets, str):  # targets=q_proj,o_proj on the command line
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if not isinstance(self.targets, list) or not self.targets:
            raise ConfigError(f"{source}: lora.targets: expected a non-empty list of module names, e.g. "
                              f"{list(ATTENTION_TARGETS)}")
        known = ATTENTION_TARGETS + MLP_TARGETS
        for name in self.targets:
            if name not in known:
                raise ConfigError(f"{source}: lora.targets: no module is named {name!r} (DeepSeek-V2's are "
                                  f"{', '.join(known)})")
        if self.experts and not set(self.targets) & set(MLP_TARGETS):
            raise ConfigError(f"{source}: lora.experts = true: add gate_proj, up_proj or down_proj to lora.targets")
        if self.experts and self.dropout:
            raise ConfigError(f"{source}: lora.dropout = {self.dropout} with lora.experts = true: routed experts "
                              f"train on merged weights, where dropout cannot apply (PEFT refuses it too); set "
                              f"lora.dropout = 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` (same weight tensor, frozen) plus ``lora_A [r, D]``, ``lora_B [O, r]``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.register_parameter("bias", None)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **kw)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **kw)
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scaling = alpha / rank

    def reset_lora(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        plain = nn.Linear(self.in_features, self.out_features, bias=False, device=self.weight.device,
                          dtype=self.weight.dtype)
        plain.weight.copy_(self.weight + self.scaling * (self.lora_B.weight @ self.lora_A.weight))
        return plain


class LoRAExperts(RoutedExperts):
    """Routed experts (same stacked tensors, frozen) with stacked factors per targeted projection:
    ``lora_{gate,up}_A [E, r, D]``, ``lora_{gate,up}_B [E, I, r]``, ``lora_down_A [E, r, I]``,
    ``lora_down_B [E, D, r]``; the grouped matmuls run on the merged weights ``W + scaling * B A``."""

    def __init__(self, base: RoutedExperts, rank: int, alpha: float, which: list[str]):
        nn.Module.__init__(self)
        self.n_experts, self.intermediate = base.n_experts, base.intermediate
        self.gate_up_proj, self.down_proj = base.gate_up_proj, base.down_proj
        self.gate_up_proj.requires_grad_(False)
        self.down_proj.requires_grad_(False)
        E, I2, D = self.gate_up_proj.shape
        I = I2 // 2
        self.which, self.scaling = list(which), alpha / rank
        kw = dict(device=self.gate_up_proj.device, dtype=self.gate_up_proj.dtype)
        shapes = {"gate": (D, I), "up": (D, I), "down": (I, D)}
        for proj in self.which:
            d_in, d_out = shapes[proj]
            self.register_parameter(f"lora_{proj}_A", nn.Parameter(torch.empty(E, rank, d_in, **kw)))
            self.register_parameter(f"lora_{proj}_B", nn.Parameter(torch.empty(E, d_out, rank, **kw)))

    def reset_lora(self) -> None:
        for proj in self.which:
            A = getattr(self, f"lora_{proj}_A")
            for e in range(A.shape[0]):  # each expert's A as an nn.Linear [r, d_in] would be drawn
                nn.init.kaiming_uniform_(A.data[e], a=math.sqrt(5))
            nn.init.zeros_(getattr(self, f"lora_{proj}_B"))

    def delta(self, proj: str) -> torch.Tensor | None:
        if proj not in self.which:
            return None
        return self.scaling * torch.bmm(getattr(self, f"lora_{proj}_B"), getattr(self, f"lora_{proj}_A"))

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        gate_up, down = self.gate_up_proj, self.down_proj
        d_gate, d_up, d_down = self.delta("gate"), self.delta("up"), self.delta("down")
        if d_gate is not None or d_up is not None:
            I = self.intermediate
            d_gate = d_gate if d_gate is not None else torch.zeros_like(gate_up[:, :I])
            d_up = d_up if d_up is not None else torch.zeros_like(gate_up[:, I:])
            gate_up = gate_up + torch.cat([d_gate, d_up], dim=1)
        if d_down is not None:
            down = down + d_down
        return gate_up, down

    @torch.no_grad()
    def merged(self) -> RoutedExperts:
        plain = RoutedExperts.__new__(RoutedExperts)
        nn.Module.__init__(plain)
        plain.n_experts, plain.intermediate = self.n_experts, self.intermediate
        gate_up, down = self.stacked_weights()
        plain.gate_up_proj, plain.down_proj = nn.Parameter(gate_up.clone()), nn.Parameter(down.clone())
        return plain


# ----- applying, merging, saving ----------------------------------------------------------------------------------
def _targets(model: nn.Module, section: LoRASection) -> list[tuple[str, nn.Module]]:
    found = []
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if isinstance(module, nn.Linear) and leaf in section.targets:
            found.append((name, module))
        elif section.experts and isinstance(module, RoutedExperts):
            found.append((name, module))
    return found


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def apply_lora(model: nn.Module, section: LoRASection) -> nn.Module:
    """Freeze ``model`` and put adapters on the targeted modules (in place; returns ``model``). A target the model
    does not have (``q_proj`` in a model with ``q_lora_rank``) is one error naming what it has."""
    for p in model.parameters():
        p.requires_grad_(False)
    found = _targets(model, section)
    hit = {name.rpartition(".")[2] for name, _ in found}
    if any(isinstance(m, RoutedExperts) for _, m in found):
        hit |= set(MLP_TARGETS) & set(section.targets)
    # q_proj and q_a_proj/q_b_proj are alternatives (q_lora_rank): naming both fits either kind of model
    if hit & {"q_a_proj", "q_b_proj"}:
        hit.add("q_proj")
    if "q_proj" in hit:
        hit |= {"q_a_proj", "q_b_proj"}
    for target in section.targets:
        if target not in hit:
            have = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
                          & set(ATTENTION_TARGETS + MLP_TARGETS))
            raise ConfigError(f"lora.targets: this model has no module named {target!r} (it has "
                              f"{', '.join(have)})")
    which = [p for p in ("gate", "up", "down") if f"{p}_proj" in section.targets]
    gen = torch.Generator().manual_seed(section.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (), generator=gen)))
        for name, module in found:
            if isinstance(module, RoutedExperts):
                wrapped = LoRAExperts(module, section.rank, section.alpha, which)
            else:
                wrapped = LoRALinear(module, section.rank, section.alpha, section.dropout)
            wrapped.reset_lora()
            _set(model, name, wrapped)
    if section.experts and not any(isinstance(m, LoRAExperts) for m in model.modules()):
        raise ConfigError("lora.experts = true: this model has no routed experts")
    return model


def is_lora(model: nn.Module) -> bool:
    return any(isinstance(m, (LoRALinear, LoRAExperts)) for m in model.modules())


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, leaving plain modules (in place; returns ``model``)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, (LoRALinear, LoRAExperts)):
            _set(model, name, module.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's saved keys: ``base_model.model.<module>.lora_A.weight``; routed experts split per expert under the
    hub's names (``...mlp.experts.{e}.gate_proj.lora_A.weight [r, D]``)."""
    out = {}
    for name, module in model.named_modules():
        prefix = f"base_model.model.{name}"
        if isinstance(module, LoRALinear):
            out[f"{prefix}.lora_A.weight"] = module.lora_A.weight.detach()
            out[f"{prefix}.lora_B.weight"] = module.lora_B.weight.detach()
        elif isinstance(module, LoRAExperts):
            for proj in module.which:
                A, B = getattr(module, f"lora_{proj}_A").detach(), getattr(module, f"lora_{proj}_B").detach()
                for e in range(A.shape[0]):
                    out[f"{prefix}.{e}.{proj}_proj.lora_A.weight"] = A[e]
                    out[f"{prefix}.{e}.{proj}_proj.lora_B.weight"] = B[e]
    return {k: v.float().contiguous().clone() for k, v in out.items()}


def adapter_config(section: LoRASection, base_model: str | None) -> dict[str, Any]:
    """``adapter_config.json`` as PEFT reads it (the fields it needs; the rest take PEFT's defaults)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": section.rank, "lora_alpha": section.alpha,
            "lora_dropout": section.dropout, "target_modules": sorted(section.targets), "bias": "none",
            "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
            "inference_mode": True, "modules_to_save": None, "base_model_name_or_path": base_model,
            "revision": None}


def save_adapter(model: nn.Module, section: LoRASection, directory: str | Path, base_model: str | None) -> Path:
    """``directory/adapter_config.json`` and ``adapter_model.safetensors`` (atomic writes)."""
    from safetensors.torch import save as st_save

    from dscoder.io import atomic_write, write_json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = st_save(adapter_state_dict(model), metadata={"format": "pt"})
    with atomic_write(directory / "adapter_model.safetensors", "wb") as f:
        f.write(data)
    write_json(directory / "adapter_config.json", adapter_config(section, base_model))
    return directory


def lora_section(raw: dict[str, Any] | None, source: str = "config") -> LoRASection:
    """The ``[lora]`` table parsed and checked (unknown keys are one error)."""
    from dscoder.train.config import parse_section

    section = parse_section(LoRASection, raw or {}, "lora", source)
    section.validate(source)
    return section
