"""Reads one half of a Qwen2.5-VL safetensors checkpoint (single file or sharded), in either tensor-name layout.

Published checkpoints (and transformers 4.x) name tensors `visual.…`, `model.…`, `lm_head.weight`; transformers 5
in memory names them `model.visual.…`, `model.language_model.…`. Both are mapped to the published names, and a
worker opens only the shards and tensors of its own half.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

VISUAL = "visual."
LANGUAGE = ("model.", "lm_head.")


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
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def read_tensors(model_dir, prefixes, dtype: torch.dtype, device="cpu") -> dict[str, torch.Tensor]:
    """Tensors whose published name starts with one of `prefixes`, keyed by published name, cast to `dtype`."""
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
        with safe_open(file, framework="pt", device=str(device)) as f:
            for stored in names:
                tensors[canonical_name(stored)] = f.get_tensor(stored).to(dtype)
    return tensors


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
