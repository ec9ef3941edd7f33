"""Reads one half of a Qwen2.5-VL safetensors checkpoint (single file or sharded), in either tensor-name layout.

Published checkpoints (and transformers 4.x) name tensors `visual.…`, `model.…`, `lm_head.weight`; transformers 5
in memory names them `model.visual.…`, `model.language_model.…`. Both are mapped to the published names, and a
worker opens only the shards and tensors of its own half.
"""

import json
from pathlib import Path

import torch
from torch import nn

VISUAL = "visual."
LANGUAGE = ("model.", "lm_head.")
DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,  # safetensors' names
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def canonical_name(name: str) -> str:
    if name.startswith("model.visual."):
        return name[len("model.") :]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    return name


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    """Stored tensor name → the safetensors file holding it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{model_dir}: neither model.safetensors nor model.safetensors.index.json found")
    return {name: single for name in _header(single)[0] if name != "__metadata__"}


def _header(file: Path) -> tuple[dict, int]:
    """A safetensors file's header (name → dtype, shape, data_offsets) and where its data starts."""
    with file.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(size)), 8 + size


def read_tensors(model_dir, prefixes, dtype: torch.dtype, device="cpu", cast_integers=True) -> dict[str, torch.Tensor]:
    """Tensors whose published name starts with one of `prefixes`, keyed by published name, cast to `dtype`; with
    cast_integers=False integer tensors stay as stored (an AWQ checkpoint's int32-packed codes)."""
    model_dir = Path(model_dir)
    prefixes = (prefixes,) if isinstance(prefixes, str) else tuple(prefixes)
    wanted: dict[Path, list[str]] = {}
    for stored, file in _tensor_files(model_dir).items():
        if canonical_name(stored).startswith(prefixes):
            wanted.setdefault(file, []).append(stored)
    tensors = {}
    for file, names in wanted.items():
        if not file.is_file():
            raise FileNotFoundError(f"{file} is listed in model.safetensors.index.json but missing")
        header, data = _header(file)
        with file.open("rb", buffering=0) as f:
            for stored in names:
                if stored not in header:
                    raise KeyError(f"{file}: tensor {stored!r} is listed in model.safetensors.index.json but not in the file")
                tensor = _read(f, data, header[stored], file, stored)
                cast = cast_integers or tensor.is_floating_point()
                tensors[canonical_name(stored)] = tensor.to(device, dtype if cast else None)
    return tensors


def _read(f, data: int, entry: dict, file: Path, name: str) -> torch.Tensor:
    """One tensor read into private memory with plain reads, not memory-mapped: a mapped checkpoint keeps every page
    that was read counted in the worker's RSS for as long as any of its tensors lives, so the originals of the
    projections stacked at load (llm_worker.model.stack_projections) would be resident twice."""
    if entry["dtype"] not in DTYPES:
        raise ValueError(f"{file}: tensor {name!r} has dtype {entry['dtype']}, which this loader does not read")
    tensor = torch.empty(entry["shape"], dtype=DTYPES[entry["dtype"]])
    buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    start, end = entry["data_offsets"]
    if end - start != len(buffer):
        raise ValueError(f"{file}: tensor {name!r} holds {end - start} bytes, its shape and dtype need {len(buffer)}")
    f.seek(data + start)
    done = 0
    while done < len(buffer):  # a read returns at most about 2 GiB
        got = f.readinto(buffer[done:])
        if not got:
            raise ValueError(f"{file}: ends inside tensor {name!r}")
        done += got
    return tensor


def load_module(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, source) -> None:
    """Assigns `tensors[prefix + name]` to every parameter of `module` (built on the meta device).

    A missing tensor or a shape mismatch is an error that names the tensor; tensors the module has no use for are
    ignored (e.g. the lm_head of a checkpoint whose embeddings are tied)."""
    state = {name: checked(tensors, prefix + name, param.shape, source)
             for name, param in module.state_dict(keep_vars=True).items()}
    module.load_state_dict(state, assign=True)


def checked(tensors: dict[str, torch.Tensor], name: str, shape, source) -> torch.Tensor:
    """tensors[name], or an error naming it: missing (KeyError) or of another shape than `shape` (ValueError)."""
    if name not in tensors:
        raise KeyError(f"{source}: tensor {name!r} is missing from the checkpoint")
    if tuple(tensors[name].shape) != tuple(shape):
        raise ValueError(f"{source}: tensor {name!r} has shape {list(tensors[name].shape)}, expected {list(shape)}")
    return tensors[name]
