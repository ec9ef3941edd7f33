"""Reads one half of a Qwen2.5-VL safetensors checkpoint (single file or sharded), in either tensor-name layout.

Published checkpoints (and transformers 4.x) name tensors `visual.…`, `model.…`, `lm_head.weight`; transformers 5
in memory names them `model.visual.…`, `model.language_model.…`. Both are mapped to the published names, and a
worker opens only the shards and tensors of its own half.

A tensor used as stored is the file's own pages, memory-mapped copy-on-write, one mapping per tensor: loading reads
nothing, only the pages the model touches become resident, and the pages of a tensor the model does not keep (one
cast, quantized or stacked into a new tensor) stop counting in the worker's RSS as soon as that tensor is freed. As
with any memory-mapped loader, the files must not be truncated or rewritten in place while the model lives.
"""

import json
import mmap
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Stored:
    """Where one tensor's bytes are: file[start:end]."""
    file: Path
    start: int
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class Checkpoint:
    """The tensors of a checkpoint whose published names start with one of `prefixes`, by published name; opening it
    reads only the headers, and checks that every tensor listed is in its file, whole, of a dtype read here."""

    def __init__(self, model_dir, prefixes):
        self.source = Path(model_dir)
        prefixes = (prefixes,) if isinstance(prefixes, str) else tuple(prefixes)
        self.stored: dict[str, Stored] = {}
        for file, listed in _shards(self.source).items():
            if listed is not None and not any(canonical_name(name).startswith(prefixes) for name in listed):
                continue  # a shard of the other half is not opened
            if not file.is_file():
                raise FileNotFoundError(f"{file} is listed in model.safetensors.index.json but missing")
            header, data = _header(file)
            size = file.stat().st_size
            for name in listed if listed is not None else [name for name in header if name != "__metadata__"]:
                if not canonical_name(name).startswith(prefixes):
                    continue
                if name not in header:
                    raise KeyError(f"{file}: tensor {name!r} is listed in model.safetensors.index.json but not in the file")
                self.stored[canonical_name(name)] = _stored(file, data, size, header[name], name)

    def __contains__(self, name: str) -> bool:
        return name in self.stored

    def __getitem__(self, name: str) -> Stored:
        if name not in self.stored:
            raise KeyError(f"{self.source}: tensor {name!r} is missing from the checkpoint")
        return self.stored[name]

    def check(self, name: str, shape) -> None:
        """An error naming tensor `name` if it is missing (KeyError) or of another shape than `shape` (ValueError)."""
        if self[name].shape != tuple(shape):
            raise ValueError(f"{self.source}: tensor {name!r} has shape {list(self[name].shape)}, expected {list(shape)}")

    def get(self, name: str, dtype: torch.dtype, device="cpu") -> torch.Tensor:
        """The tensor on `device`, in `dtype` if it is floating-point (integer tensors stay as stored: an AWQ
        checkpoint's int32-packed codes); mapped (no copy) when it is stored so and the device is the CPU."""
        stored = self[name]
        return _mapped(stored).to(device, dtype if stored.dtype.is_floating_point else None)

    def concat(self, names: list[str], dtype: torch.dtype, device="cpu") -> torch.Tensor:
        """Tensors (checked to fit) concatenated along dim 0, in `dtype` on `device`: mapped when they lie back to back
        in one file, in that order, as stored (a layer's gate_proj and up_proj do in files written by safetensors,
        which orders tensors by name); else read from the file straight into their rows of one new tensor."""
        parts = [self.stored[name] for name in names]
        first, last = parts[0], parts[-1]
        shape = (sum(part.shape[0] for part in parts), *first.shape[1:])
        if all(a.file == b.file and a.end == b.start and a.dtype == b.dtype for a, b in zip(parts, parts[1:])):
            return _mapped(Stored(first.file, first.start, last.end, first.dtype, shape)).to(device, dtype)
        out, row = torch.empty(shape, dtype=dtype), 0
        for part in parts:
            rows = out[row : row + part.shape[0]]
            if part.dtype == dtype:
                _read_into(rows, part)
            else:
                rows.copy_(_mapped(part))
            row += part.shape[0]
        return out.to(device)


def read_tensors(model_dir, prefixes, dtype: torch.dtype, device="cpu") -> dict[str, torch.Tensor]:
    """Tensors whose published name starts with one of `prefixes`, keyed by published name, as Checkpoint.get gives
    them."""
    checkpoint = Checkpoint(model_dir, prefixes)
    return {name: checkpoint.get(name, dtype, device) for name in checkpoint.stored}


def _shards(model_dir: Path) -> dict[Path, list[str] | None]:
    """Each safetensors file → the stored tensor names the index puts in it; a single model.safetensors → None (its
    own header names them)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards: dict[Path, list[str]] = {}
        for name, file in json.loads(index.read_text())["weight_map"].items():
            shards.setdefault(model_dir / file, []).append(name)
        return shards
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{model_dir}: neither model.safetensors nor model.safetensors.index.json found")
    return {single: None}


def _header(file: Path) -> tuple[dict, int]:
    """A safetensors file's header (name → dtype, shape, data_offsets) and where its data starts."""
    with file.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(size)), 8 + size


def _stored(file: Path, data: int, size: int, entry: dict, name: str) -> Stored:
    if entry["dtype"] not in DTYPES:
        raise ValueError(f"{file}: tensor {name!r} has dtype {entry['dtype']}, which this loader does not read")
    dtype, shape = DTYPES[entry["dtype"]], tuple(entry["shape"])
    start, end = (data + offset for offset in entry["data_offsets"])
    needed = dtype.itemsize * torch.Size(shape).numel()
    if end - start != needed:
        raise ValueError(f"{file}: tensor {name!r} holds {end - start} bytes, its shape and dtype need {needed}")
    if end > size:
        raise ValueError(f"{file}: ends inside tensor {name!r}")
    return Stored(file, start, end, dtype, shape)


def _mapped(stored: Stored) -> torch.Tensor:
    """file[start:end] as a tensor on a copy-on-write mapping of its own pages (writes never reach the file); the
    mapping is unmapped when the last tensor viewing it is freed."""
    if stored.end == stored.start:
        return torch.empty(stored.shape, dtype=stored.dtype)
    page = stored.start - stored.start % mmap.ALLOCATIONGRANULARITY
    with stored.file.open("rb") as f:
        pages = mmap.mmap(f.fileno(), stored.end - page, offset=page, access=mmap.ACCESS_COPY)
    count = (stored.end - stored.start) // stored.dtype.itemsize
    return torch.frombuffer(pages, dtype=stored.dtype, offset=stored.start - page, count=count).view(stored.shape)


def _read_into(out: torch.Tensor, stored: Stored) -> None:
    """Reads file[start:end] into `out` (contiguous, as many bytes) with plain reads, which map no page of the file."""
    buffer = memoryview(out.view(-1).view(torch.uint8).numpy())
    with stored.file.open("rb", buffering=0) as f:
        f.seek(stored.start)
        done = 0
        while done < len(buffer):  # a read returns at most about 2 GiB
            got = f.readinto(buffer[done:])
            if not got:
                raise ValueError(f"{stored.file}: ends inside a tensor at byte {stored.start + done} (changed while read)")
            done += got


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
