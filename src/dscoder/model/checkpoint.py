"""HF checkpoints both ways: a directory with ``config.json`` and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``).

The hub stores routed experts one by one (``mlp.experts.{e}.gate_proj.weight`` ...); transformers 5 and dscoder
stack them (``mlp.experts.gate_up_proj [E, 2I, D]``, ``mlp.experts.down_proj [E, D, I]``). Loading accepts both;
saving writes the hub layout, which every loader reads. The model is built on the meta device and each tensor is
read from the memory-mapped files straight into its final dtype and device, so loading needs about one copy of
the weights in RAM.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dscoder.config import ModelConfig
from dscoder.errors import CheckpointError, DscoderError
from dscoder.io import atomic_path, write_json
from dscoder.model.transformer import DeepseekV2

_STACKED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise DscoderError(f"unknown dtype '{dtype}' (expected one of {', '.join(_DTYPES)})") from None


def _weight_files(directory: Path) -> dict[str, Path]:
    """Map every tensor key to the file that holds it."""
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        files = {k: directory / v for k, v in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.exists():
                raise CheckpointError(f"{f}: shard listed in {index.name} is missing")
        return files
    if single.exists():
        with _open(single) as f:
            return {k: single for k in f.keys()}
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


# Other layouts of a DeepSeek-V2 checkpoint directory, tried before the plain HF one: (recognises(directory),
# load(directory, dtype=, device=)). The packages built on the model register theirs (dscoder.quant its quantized
# checkpoints), so the model package never imports them.
CHECKPOINT_FORMATS: list[tuple[Callable[[Path], bool], Callable[..., DeepseekV2]]] = []


def register_checkpoint_format(recognises: Callable[[Path], bool], load: Callable[..., DeepseekV2]) -> None:
    """Have :func:`load_checkpoint` hand a directory ``recognises`` accepts to ``load``."""
    CHECKPOINT_FORMATS.append((recognises, load))


def load_checkpoint(directory: str | Path, dtype: torch.dtype | str | None = None,
                    device: torch.device | str = "cpu") -> DeepseekV2:
    """Load an HF-format DeepSeek-V2 checkpoint directory; ``dtype`` None keeps the stored dtype."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    for recognises, load in CHECKPOINT_FORMATS:  # e.g. `dscoder quantize`'s: integer weights, memory-mapped
        if recognises(directory):
            return load(directory, dtype=parse_dtype(dtype), device=device)
    config = ModelConfig.from_json_file(directory / "config.json")
    dtype = parse_dtype(dtype)
    files = _weight_files(directory)
    with torch.device("meta"):
        model = DeepseekV2(config)
    expected = model.state_dict()
    used: set[str] = set()
    loaded: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        handles = {p: stack.enter_context(_open(p)) for p in sorted(set(files.values()))}

        def read(key: str) -> torch.Tensor:
            used.add(key)
            try:
                t = handles[files[key]].get_tensor(key)
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{files[key]}: cannot read tensor '{key}' ({e})") from None
            return t.to(device=device, dtype=dtype or t.dtype)

        for key, meta in expected.items():
            if config.tie_word_embeddings and key == "lm_head.weight":
                continue
            m = _STACKED.match(key)
            if key in files:
                tensor = read(key)
            elif m is not None:
                tensor = _stack_experts(m.group(1), m.group(2), config, files, read)
            else:
                raise CheckpointError(f"{directory}: missing tensor '{key}'")
            if tensor.shape != meta.shape:
                raise CheckpointError(f"{directory}: tensor '{key}' has shape {list(tensor.shape)}; "
                                      f"expected {list(meta.shape)}")
            loaded[key] = tensor
    unexpected = sorted(set(files) - used - _ignorable(files, config))
    if unexpected:
        raise CheckpointError(f"{directory}: unexpected tensor '{unexpected[0]}'"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    model, _, _ = DeepseekV2.from_state_dict(config, loaded, strict=not config.tie_word_embeddings)
    return model


def _ignorable(files: dict[str, Path], config: ModelConfig) -> set[str]:
    """Keys that carry nothing: rotary caches some exporters write, and a tied head."""
    skip = {k for k in files if k.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        skip.add("lm_head.weight")
    return skip


def _stack_experts(prefix, which, config, files, read) -> torch.Tensor:
    E = config.n_routed_experts
    names = ("gate_proj", "up_proj") if which == "gate_up_proj" else ("down_proj",)
    parts = []
    for name in names:
        keys = [f"{prefix}.{e}.{name}.weight" for e in range(E)]
        for k in keys:
            if k not in files:
                raise CheckpointError(f"missing tensor '{k}' (nor is '{prefix}.{which}' present)")
        parts.append(torch.stack([read(k) for k in keys]))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def hub_state_dict(model: DeepseekV2) -> dict[str, torch.Tensor]:
    """Our state dict with stacked experts split into the hub's per-expert keys (views, no copies)."""
    out: dict[str, torch.Tensor] = {}
    inter = model.config.moe_intermediate_size
    for key, t in model.state_dict().items():
        if model.config.tie_word_embeddings and key == "lm_head.weight":
            continue
        m = _STACKED.match(key)
        if m is None:
            out[key] = t
        elif m.group(2) == "gate_up_proj":
            for e in range(t.shape[0]):
                out[f"{m.group(1)}.{e}.gate_proj.weight"] = t[e, :inter]
                out[f"{m.group(1)}.{e}.up_proj.weight"] = t[e, inter:]
        else:
            for e in range(t.shape[0]):
                out[f"{m.group(1)}.{e}.down_proj.weight"] = t[e]
    return out


def save_checkpoint(model: DeepseekV2, directory: str | Path, dtype: torch.dtype | str | None = None,
                    max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write ``config.json``, ``generation_config.json`` and safetensors shards (with an index when more than one).

    Files are written under temporary names and renamed, so an interrupted save leaves no half-written shard.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = parse_dtype(dtype)
    state = hub_state_dict(model)
    elem = {k: (dtype or t.dtype).itemsize for k, t in state.items()}
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in state.items():  # plan the shards first, then materialize one at a time
        nbytes = t.numel() * elem[key]
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    stored = next(iter(state.values())).dtype if dtype is None else dtype
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, keys in zip(names, shards):
        # clone: safetensors refuses tensors that share storage, as the per-expert views of a stack do
        tensors = {k: state[k].detach().to(device="cpu", dtype=dtype or state[k].dtype, copy=True) for k in keys}
        with atomic_path(directory / name) as tmp:  # 0644: a checkpoint is meant to be shared
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        del tensors
    stale = [p for p in directory.glob("model*.safetensors") if p.name not in names]
    for p in stale:
        p.unlink()
    index = directory / "model.safetensors.index.json"
    if len(shards) > 1:
        total = sum(state[k].numel() * elem[k] for k in state)
        weight_map = {k: n for n, keys in zip(names, shards) for k in keys}
        write_json(index, {"metadata": {"total_size": total}, "weight_map": weight_map})
    elif index.exists():
        index.unlink()
    c = model.config
    write_json(directory / "config.json", c.to_hf_dict(dtype=str(stored).removeprefix("torch.")))
    write_json(directory / "generation_config.json",
               {"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id})
    return directory

