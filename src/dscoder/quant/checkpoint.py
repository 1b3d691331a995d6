"""Quantized checkpoints: written tensor by tensor from a float checkpoint, read back memory-mapped.

Layout: ``config.json`` (the model's keys plus ``quantization_config``: ``{"quant_method": "dscoder", "bits",
"group_size", "modules_not_converted"}``), ``generation_config.json``, the tokenizer when the source has one, and
safetensors shards. A quantized matrix ``NAME.weight`` is stored as ``NAME.weight.qweight`` and
``NAME.weight.scales`` (layouts in :mod:`dscoder.quant.kernels`); routed experts stay stacked
(``...mlp.experts.gate_up_proj.qweight [E, 2I, D]``). Everything else is stored as in an HF checkpoint.

Loading maps each file privately (copy-on-write) and takes int8 weights and the high-precision tensors as views of
the mapping, so the weights are in memory once (the page cache's copy); int4 weights are repacked for the kernel one
matrix at a time into preallocated buffers, and each stored matrix's pages are dropped from the mapping once it is
repacked, so loading holds the int4 weights about once too.
"""

from __future__ import annotations

import json
import mmap
import shutil
import struct
from pathlib import Path

import torch

from dscoder.config import ModelConfig
from dscoder.errors import CheckpointError, DscoderError
from dscoder.io import atomic_path, write_json
from dscoder.quant.modules import check_scheme, default_layout, stored_weights, swap_modules, to_runtime

_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I8": torch.int8,
              "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64, "F64": torch.float64, "BOOL": torch.bool}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SHARD_BYTES = 2 * 1024**3


def quantization_config(directory: str | Path) -> dict | None:
    """The ``quantization_config`` of a checkpoint directory's ``config.json`` (None when it has none)."""
    path = Path(directory) / "config.json"
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    q = d.get("quantization_config") if isinstance(d, dict) else None
    return q if isinstance(q, dict) else None


def is_quantized(directory: str | Path) -> bool:
    q = quantization_config(directory)
    return q is not None and q.get("quant_method") == "dscoder"


def _read_config(directory: Path) -> tuple[ModelConfig, dict]:
    d = json.loads((directory / "config.json").read_text())
    q = d.pop("quantization_config")
    bits, group = q.get("bits"), q.get("group_size")
    try:
        check_scheme(bits, group)
    except DscoderError as e:
        raise CheckpointError(f"{directory / 'config.json'}: quantization_config: {e}") from None
    return ModelConfig.from_hf_dict(d, source=str(directory / "config.json")), q


# ----- reading -------------------------------------------------------------------------------------------------
def mmap_safetensors(path: Path, mappings: list | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view of a private (copy-on-write) mapping of it (the mapping is
    appended to ``mappings`` when given)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= size - 8:
                raise CheckpointError(f"{path}: not a safetensors file (bad header length)")
            header = json.loads(f.read(n))
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if mm is not None and mappings is not None:
        mappings.append(mm)
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[meta["dtype"]]
            shape, (begin, end) = [int(s) for s in meta["shape"]], meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor '{key}' has a malformed header entry") from None
        count = 1
        for s in shape:
            count *= s
        if not (0 <= begin <= end and 8 + n + end <= size and end - begin == count * dtype.itemsize):
            raise CheckpointError(f"{path}: tensor '{key}' lies outside the file or has the wrong size "
                                  f"(truncated or damaged)")
        if count == 0:
            out[key] = torch.empty(shape, dtype=dtype)
        else:
            out[key] = torch.frombuffer(mm, dtype=dtype, count=count, offset=8 + n + begin).view(shape)
    return out


def _shards(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        files = [directory / n for n in names]
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{f}: shard listed in {index.name} is missing")
        return files
    if (directory / "model.safetensors").exists():
        return [directory / "model.safetensors"]
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def load_quantized(directory: str | Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                   layout: str | None = None):
    """A quantized checkpoint as a :class:`~dscoder.DeepseekV2` whose quantized modules are
    :class:`~dscoder.quant.QuantLinear` / :class:`~dscoder.quant.QuantExperts`. ``dtype`` applies to the
    high-precision tensors (default: as stored)."""
    from dscoder.model.transformer import DeepseekV2

    directory = Path(directory)
    config, q = _read_config(directory)
    bits, group = q["bits"], q.get("group_size")
    layout = layout or default_layout(bits, device)
    stored: dict[str, torch.Tensor] = {}
    mappings: list[mmap.mmap] = []
    for f in _shards(directory):
        stored.update(mmap_safetensors(f, mappings))
    release = _page_dropper(mappings)
    store_dtype = stored["model.embed_tokens.weight"].dtype if "model.embed_tokens.weight" in stored else None
    dtype = dtype or store_dtype or torch.bfloat16
    with torch.device("meta"):
        expected = DeepseekV2(config)
        model = DeepseekV2(config)
    swap_modules(expected, bits, group, "reference", dtype)
    swap_modules(model, bits, group, layout, dtype)
    wanted = expected.state_dict()
    if config.tie_word_embeddings:
        wanted.pop("lm_head.weight", None)
    for key, meta in wanted.items():
        t = stored.get(key)
        if t is None:
            raise CheckpointError(f"{directory}: missing tensor '{key}'")
        if t.shape != meta.shape or (not meta.is_floating_point() and t.dtype != meta.dtype):
            raise CheckpointError(f"{directory}: tensor '{key}' is {t.dtype} {list(t.shape)}; expected "
                                  f"{meta.dtype} {list(meta.shape)}")
    extra = sorted(set(stored) - set(wanted) - {k for k in stored if k.endswith("rotary_emb.inv_freq")})
    if extra:
        raise CheckpointError(f"{directory}: unexpected tensor '{extra[0]}'")
    state = {}
    for key in wanted:
        if key.endswith(".qweight"):
            prefix = key.removesuffix(".qweight")
            runtime = to_runtime(bits, layout, stored[key], stored[prefix + ".scales"], dtype, release)
            qw, sc = (_aligned(t) for t in runtime)
            state[key], state[prefix + ".scales"] = qw.to(device), sc.to(device)
        elif not key.endswith(".scales"):
            state[key] = stored[key].to(device=device, dtype=dtype)  # a view of the mapping when nothing changes
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_buffers()
    model.quantization = {"bits": bits, "group_size": group}
    return model


def _page_dropper(mappings: list[mmap.mmap]):
    """``drop(t)``: forget the pages of the mapped tensor ``t`` (those wholly inside it) after it has been copied
    elsewhere. The mappings are private and unwritten, so a later read would fetch the file's bytes again; what it
    saves is resident memory while int4 weights are repacked (the stored codes and their repacked copy at once)."""
    if not mappings or not hasattr(mmap, "MADV_DONTNEED"):
        return None
    spans = [(torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr(), len(mm), mm) for mm in mappings]

    def drop(t: torch.Tensor) -> None:
        a, n = t.data_ptr(), t.numel() * t.element_size()
        for base, size, mm in spans:
            if base <= a and a + n <= base + size:
                page = mmap.PAGESIZE
                lo, hi = -(-(a - base) // page) * page, (a + n - base) // page * page
                if hi > lo:
                    mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
                return

    return drop


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or an aligned copy where the file placed it off ``ALIGN`` (another writer's file; the kernels need it)."""
    return t if t.data_ptr() % ALIGN == 0 else t.clone()


# ----- writing -------------------------------------------------------------------------------------------------
ALIGN = 64  # PyTorch's int8 kernel reads weights with aligned vector loads from 4 rows of activations on
_DTYPE_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file (any reader takes it) laid out for mapping: the data starts at a multiple of ``ALIGN``
    bytes and the tensors whose sizes are multiples of it come first, so each of them starts aligned (the format
    allows no gaps between tensors)."""
    order = sorted(tensors, key=lambda k: tensors[k].numel() * tensors[k].element_size() % ALIGN != 0)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for k in order:
        t = tensors[k]
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % ALIGN)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for k in order:
            f.write(tensors[k].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


@torch.no_grad()
def quantize_checkpoint(source: str | Path, out: str | Path, bits: int = 8, group_size: int | None = None,
                        dtype: str = "bfloat16") -> Path:
    """Quantize an HF checkpoint directory ``source`` into ``out`` (high-precision tensors in ``dtype``)."""
    from dscoder.model.build import load_model
    from dscoder.model.checkpoint import parse_dtype

    if bits == 4 and group_size is None:
        group_size = 128
    check_scheme(bits, group_size)
    source, out = Path(source), Path(out)
    if not (source / "config.json").is_file():
        raise DscoderError(f"{source}: not an HF checkpoint directory (no config.json)")
    if is_quantized(source):
        raise DscoderError(f"{source}: already quantized; quantize the float checkpoint")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DscoderError(f"{out}: --out must be a new or empty directory")
    if out.resolve() == source.resolve():
        raise DscoderError(f"{out}: --out is the source checkpoint")
    hp = parse_dtype(dtype)
    model = load_model(source)  # stored dtype; the float weights are read once
    converted = set()
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]

    def add(key: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and sizes[-1] + nbytes > SHARD_BYTES:
            shards.append({})
            sizes.append(0)
        shards[-1][key] = t.contiguous()
        sizes[-1] += nbytes

    for key, q, s in stored_weights(model, bits, group_size):
        add(f"{key}.qweight", q)
        add(f"{key}.scales", s.to(hp))
        converted.add(key)
    for key, t in model.state_dict().items():
        if key not in converted and not (model.config.tie_word_embeddings and key == "lm_head.weight"):
            add(key, t.detach().to(hp))
    out.mkdir(parents=True, exist_ok=True)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, tensors in zip(names, shards):
        write_safetensors(out / name, tensors)
    if len(shards) > 1:
        write_json(out / "model.safetensors.index.json",
                   {"metadata": {"total_size": sum(sizes)},
                    "weight_map": {k: n for n, t in zip(names, shards) for k in t}})
    c = model.config
    d = c.to_hf_dict(dtype=str(hp).removeprefix("torch."))
    d["quantization_config"] = {"quant_method": "dscoder", "bits": bits, "group_size": group_size,
                                "modules_not_converted": ["model.embed_tokens", "*.kv_b_proj", "*.mlp.gate",
                                                          "*layernorm", "model.norm"]}
    write_json(out / "config.json", d)
    write_json(out / "generation_config.json", {"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id})
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    return out


# ----- facts ---------------------------------------------------------------------------------------------------
def _header_sizes(path: Path) -> dict[str, int]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def decode_bytes_per_token(directory: str | Path) -> dict[str, int]:
    """From the safetensors headers (nothing loaded): ``weights`` (bytes of every tensor) and ``per_token`` (what
    one decode step reads: everything but the routed experts the token skips and the embedding rows it does not look
    up). The memory-bandwidth limit on decode speed is ``bandwidth / per_token`` tokens/s."""
    directory = Path(directory)
    d = json.loads((directory / "config.json").read_text())
    d.pop("quantization_config", None)
    c = ModelConfig.from_hf_dict(d, source=str(directory / "config.json"))
    sizes: dict[str, int] = {}
    for f in _shards(directory):
        sizes.update(_header_sizes(f))
    per_token = 0.0
    for key, nbytes in sizes.items():
        if ".mlp.experts." in key:
            per_token += nbytes * c.num_experts_per_tok / c.n_routed_experts
        elif key.startswith("model.embed_tokens"):
            per_token += nbytes / c.vocab_size
        else:
            per_token += nbytes
    return {"weights": sum(sizes.values()), "per_token": int(per_token)}
