"""The wire protocol between the front end, the visual worker and the LLM worker.

A message is a ZeroMQ multipart message: frame 0 is a msgpack header (protocol version, message type, request
id, the type's fields, and one descriptor per tensor), each further frame is one tensor's raw bytes. No pickle.
image_embeds travel split along the hidden dimension into `chunk_width`-wide chunks, one frame each.
"""

import math
import warnings
from dataclasses import dataclass, field

import msgpack
import torch
from torch import Tensor

VERSION = 2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8,
          "int64": torch.int64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# message type → required header fields and their types
SCHEMAS = {
    "request": {"messages": list, "sampling": dict},
    "embeds": {"prompt_ids": list, "image_grid_thw": list, "video_grid_thw": list, "second_per_grid_ts": list,
               "sampling": dict, "hidden": int, "chunk_width": int, "dtype": str, "timings": dict},
    # one per decode step (id ""): [request id, new token ids, text that may be shown now] for every request that
    # got a token, so a batch of 8 is one message, not 8
    "tokens": {"requests": list},
    "finish": {"finish_reason": str, "prompt_tokens": int, "completion_tokens": int, "timings": dict},
    "error": {"message": str, "code": int},  # code 400: the request was at fault; 500: the pipeline was
    "ready": {"worker": str},
    "ping": {},
    "cancel": {},  # front end → visual worker → LLM worker, in order behind the request it names
}


class ProtocolError(ValueError):
    """A message that breaks the protocol; `request_id` is set when the header named one."""

    def __init__(self, message: str, request_id: str | None = None):
        super().__init__(message)
        self.request_id = request_id


@dataclass
class Message:
    type: str
    id: str
    fields: dict = field(default_factory=dict)
    tensors: list[tuple[dict, Tensor]] = field(default_factory=list)  # (descriptor, tensor)

    def encode(self) -> list:
        descriptors = []
        frames = []
        for desc, t in self.tensors:
            t = t.detach().contiguous().cpu()
            descriptors.append({**desc, "dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape)})
            frames.append(t.view(torch.uint8).numpy().data if t.numel() else b"")  # zero-copy buffer
        header = {"v": VERSION, "type": self.type, "id": self.id, "fields": self.fields, "tensors": descriptors}
        return [msgpack.packb(header), *frames]


def error_message(request_id: str, error: Exception) -> Message:
    """The error reply for a failed request: code 400 when the request's content was at fault (an unreadable image,
    a prompt past the context, bad sampling values: ValueError or KeyError), 500 for anything else, a broken message
    between the processes (ProtocolError) included."""
    bad_input = isinstance(error, (ValueError, KeyError)) and not isinstance(error, ProtocolError)
    return Message("error", request_id, {"message": f"{type(error).__name__}: {error}", "code": 400 if bad_input else 500})


def decode(frames: list) -> Message:
    """Checks every part of an arriving message; anything off raises ProtocolError saying what."""
    if not frames:
        raise ProtocolError("empty message")
    try:
        header = msgpack.unpackb(bytes(frames[0].buffer if hasattr(frames[0], "buffer") else frames[0]))
    except Exception as e:
        raise ProtocolError(f"header is not valid msgpack: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a map")
    rid = header.get("id") if isinstance(header.get("id"), str) else None
    if header.get("v") != VERSION:
        raise ProtocolError(f"protocol version {header.get('v')!r}, this build speaks {VERSION}", rid)
    kind = header.get("type")
    if kind not in SCHEMAS:
        raise ProtocolError(f"unknown message type {kind!r}; known: {sorted(SCHEMAS)}", rid)
    if rid is None:
        raise ProtocolError(f"{kind} message without a string request id")
    fields = header.get("fields")
    if not isinstance(fields, dict):
        raise ProtocolError(f"{kind} message: fields is not a map", rid)
    for name, typ in SCHEMAS[kind].items():
        if not isinstance(fields.get(name), typ):
            raise ProtocolError(f"{kind} message: field {name!r} must be {typ.__name__}, got {fields.get(name)!r}", rid)
    descriptors = header.get("tensors")
    if not isinstance(descriptors, list) or len(descriptors) != len(frames) - 1:
        raise ProtocolError(f"{kind} message: {len(frames) - 1} tensor frames but header describes "
                            f"{len(descriptors) if isinstance(descriptors, list) else 'none'}", rid)
    tensors = []
    for desc, frame in zip(descriptors, frames[1:]):
        tensors.append((desc, _tensor(desc, frame, kind, rid)))
    return Message(kind, rid, fields, tensors)


def _tensor(desc, frame, kind: str, rid: str) -> Tensor:
    if not isinstance(desc, dict) or desc.get("dtype") not in DTYPES or not isinstance(desc.get("shape"), list):
        raise ProtocolError(f"{kind} message: bad tensor descriptor {desc!r}", rid)
    dtype, shape = DTYPES[desc["dtype"]], desc["shape"]
    buf = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
    expected = math.prod(shape) * dtype.itemsize
    if buf.nbytes != expected:
        raise ProtocolError(f"{kind} message: tensor {desc.get('name')!r} {desc['dtype']}{shape} needs {expected} "
                            f"bytes, frame has {buf.nbytes}", rid)
    if not expected:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():  # zmq frames are read-only; the tensor is only read
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape)


def split_hidden_chunks(embeds: Tensor, width: int) -> list[Tensor]:
    """(N, hidden) → [(N, width), ..., (N, hidden % width or width)] along the hidden dimension."""
    if width < 1:
        raise ValueError(f"chunk width must be positive, got {width}")
    return list(embeds.split(width, dim=1))


def chunk_descriptors(kind: str, embeds: Tensor, width: int) -> list[tuple[dict, Tensor]]:
    return [({"name": kind, "index": i}, c) for i, c in enumerate(split_hidden_chunks(embeds, width))]


def assemble_chunks(msg: Message, kind: str, rows: int, hidden: int, width: int, dtype: torch.dtype) -> Tensor | None:
    """Reassembles the `kind` chunks of an embeds message into (rows, hidden); None when rows == 0.

    A missing, duplicate, mis-sized or mis-typed chunk raises ProtocolError naming it."""
    chunks = [(d, t) for d, t in msg.tensors if d.get("name") == kind]
    count = math.ceil(hidden / width)
    if rows == 0:
        if chunks:
            raise ProtocolError(f"{len(chunks)} {kind} chunks arrived for a prompt with no {kind}", msg.id)
        return None
    out = torch.empty(rows, hidden, dtype=dtype)
    seen = set()
    for desc, t in chunks:
        i = desc.get("index")
        if not isinstance(i, int) or not 0 <= i < count:
            raise ProtocolError(f"{kind} chunk index {i!r} outside 0..{count - 1}", msg.id)
        if i in seen:
            raise ProtocolError(f"{kind} chunk {i} arrived twice", msg.id)
        seen.add(i)
        w = min(width, hidden - i * width)
        if tuple(t.shape) != (rows, w):
            raise ProtocolError(f"{kind} chunk {i} has shape {list(t.shape)}, expected {[rows, w]}", msg.id)
        if t.dtype != dtype:
            raise ProtocolError(f"{kind} chunk {i} is {DTYPE_NAMES[t.dtype]}, expected {DTYPE_NAMES[dtype]}", msg.id)
        out[:, i * width : i * width + w] = t
    if len(seen) != count:
        missing = sorted(set(range(count)) - seen)
        raise ProtocolError(f"{kind} chunks {missing} of {count} are missing", msg.id)
    return out
