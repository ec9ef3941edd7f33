"""The wire format of common/messages.py: a ZeroMQ multipart message whose frame 0 is msgpack `[VERSION, message]`
and whose further frames are the raw bytes of the message's tensors and blobs, in the order the header names them
(zero-copy both ways, never pickle). `decode` checks the version, every field against its declared type, every
tensor's dtype, shape and byte count, and that each frame is used exactly once; anything off is a ProtocolError
naming the request when the header named one. A message to the front end comes after a frame naming its sender
(`decode_sent`), one on the embeds socket after a frame naming the LLM worker it is for (`topic`). image_embeds travel as hidden-dimension chunks (`split_hidden_chunks`,
`assemble_chunks`)."""

import math
import threading
import warnings

import msgspec
import torch
from torch import Tensor

from common.config import DTYPES as MODEL_DTYPES
from common.messages import Blob, Chunk, Embeds, Error, Message, WorkerName

VERSION = 5
DTYPES = {**MODEL_DTYPES, "uint8": torch.uint8, "int64": torch.int64}  # what a tensor frame may hold
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_DIMS = 8


class ProtocolError(ValueError):
    """A message that breaks the protocol; `request_id` is set when the header named one."""

    def __init__(self, message: str, request_id: str | None = None):
        super().__init__(message)
        self.request_id = request_id


class _Named(msgspec.Struct):
    """Any message read leniently for its id alone, so an error can name the request a broken message was for."""

    id: str | None = None


_state = threading.local()  # the frames of the message being encoded or decoded on this thread


def _encode_frame(obj):
    frames = _state.frames
    if isinstance(obj, Tensor):
        t = obj.detach().contiguous().cpu()
        if t.dtype not in DTYPE_NAMES:
            raise TypeError(f"tensors of dtype {t.dtype} cannot travel; allowed: {sorted(DTYPES)}")
        frames.append(t.view(torch.uint8).numpy().data if t.numel() else b"")  # a zero-copy buffer
        return ["tensor", DTYPE_NAMES[t.dtype], list(t.shape), len(frames) - 1]
    if isinstance(obj, Blob):
        frames.append(obj.data)
        return ["blob", len(frames) - 1]
    raise NotImplementedError(f"{type(obj).__name__} cannot travel")  # msgspec's signal for a type a hook refuses


def _frame(index) -> memoryview:
    frames, used = _state.frames, _state.used
    if not isinstance(index, int) or not 1 <= index < len(frames):
        raise ValueError(f"frame {index!r} is not one of the message's {len(frames) - 1} data frames")
    if index in used:
        raise ValueError(f"frame {index} is named twice")
    used.add(index)
    frame = frames[index]
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


def _decode_frame(kind: type, obj):
    if kind is Blob:
        if not (isinstance(obj, list) and len(obj) == 2 and obj[0] == "blob"):
            raise ValueError(f"expected a blob descriptor ['blob', frame], got {obj!r}"[:200])
        return Blob(_frame(obj[1]))
    if kind is Tensor:
        if not (isinstance(obj, list) and len(obj) == 4 and obj[0] == "tensor"):
            raise ValueError(f"expected a tensor descriptor ['tensor', dtype, shape, frame], got {obj!r}"[:200])
        _, dtype_name, shape, index = obj
        if dtype_name not in DTYPES:
            raise ValueError(f"tensor dtype {dtype_name!r} is not one of {sorted(DTYPES)}")
        if not (isinstance(shape, list) and len(shape) <= MAX_DIMS
                and all(isinstance(n, int) and 0 <= n < 2**40 for n in shape)):
            raise ValueError(f"tensor shape {shape!r} must be at most {MAX_DIMS} non-negative sizes"[:200])
        dtype = DTYPES[dtype_name]
        buf = _frame(index)
        expected = math.prod(shape) * dtype.itemsize
        if buf.nbytes != expected:
            raise ValueError(f"tensor {dtype_name}{shape} needs {expected} bytes, its frame has {buf.nbytes}")
        if not expected:
            return torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():  # zmq frames are read-only; the tensor is only read
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape)
    raise NotImplementedError(f"{kind.__name__} cannot travel")  # msgspec's signal for a type a hook refuses


_encoder = msgspec.msgpack.Encoder(enc_hook=_encode_frame)
_envelope = msgspec.msgpack.Decoder(tuple[int, msgspec.Raw])
_named = msgspec.msgpack.Decoder(_Named)
_message = msgspec.msgpack.Decoder(Message, dec_hook=_decode_frame)


def encode(msg: Message) -> list:
    """msg → [header, *data frames], ready for send_multipart (copy=False keeps the tensors zero-copy)."""
    _state.frames = [None]
    try:
        header = _encoder.encode((VERSION, msg))
        frames = _state.frames
    finally:
        _state.frames = None
    frames[0] = header
    return frames


def decode(frames: list) -> Message:
    """A received multipart message (bytes or zmq Frames) → its typed message; anything off raises ProtocolError."""
    if not frames:
        raise ProtocolError("empty message")
    head = frames[0]
    try:
        version, raw = _envelope.decode(head.buffer if hasattr(head, "buffer") else head)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ProtocolError(f"the header is not [version, message] msgpack: {e}") from None
    try:
        rid = _named.decode(raw).id
    except (msgspec.DecodeError, msgspec.ValidationError):
        rid = None
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}, this build speaks {VERSION}", rid)
    _state.frames, _state.used = frames, set()
    try:
        msg = _message.decode(raw)
        unused = len(frames) - 1 - len(_state.used)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ProtocolError(f"malformed message: {e}", rid) from None
    finally:
        _state.frames = _state.used = None
    if unused:
        raise ProtocolError(f"{type(msg).__name__} message: {unused} of its {len(frames) - 1} data frames are not "
                            "named by the header", rid)
    return msg


def topic(llm: str) -> bytes:
    """The first frame of an Embeds or Cancel on the embeds socket: the LLM worker it is for (subscriptions are
    prefix matches, so the name is closed by a NUL). BROADCAST (Ping) reaches every LLM worker."""
    return llm.encode() + b"\0"


BROADCAST = b"\0"


def decode_sent(frames: list) -> tuple[str, Message]:
    """A message to the front end, [sender's name, header, *data frames] → (name, message)."""
    if len(frames) < 2:
        raise ProtocolError("a message to the front end starts with a frame naming its sender")
    try:
        name = msgspec.convert(bytes(frames[0]).decode(), WorkerName)
    except (UnicodeDecodeError, msgspec.ValidationError) as e:
        raise ProtocolError(f"the sender frame is not a worker name: {e}") from None
    return name, decode(frames[1:])


def error_message(request_id: str, error: Exception) -> Error:
    """The error reply for a failed request: code 400 with the error's own words when the request's content was at
    fault (an unreadable image, a prompt past the context: a ValueError), 500 naming the kind of failure for anything
    else, a broken message between the processes (ProtocolError) included."""
    if isinstance(error, ValueError) and not isinstance(error, ProtocolError):
        return Error(request_id, str(error), 400)
    return Error(request_id, f"{type(error).__name__}: {error}", 500)


def split_hidden_chunks(embeds: Tensor, width: int) -> list[Tensor]:
    """(N, hidden) → [(N, width), ..., (N, hidden % width or width)] along the hidden dimension."""
    if width < 1:
        raise ValueError(f"chunk width must be positive, got {width}")
    return list(embeds.split(width, dim=1))


def hidden_chunks(kind: str, embeds: Tensor, width: int) -> list[Chunk]:
    return [Chunk(kind, i, c) for i, c in enumerate(split_hidden_chunks(embeds, width))]


def assemble_chunks(msg: Embeds, kind: str, rows: int) -> Tensor | None:
    """Reassembles the `kind` chunks of an embeds message into (rows, hidden); None when rows == 0.

    A missing, duplicate, mis-sized or mis-typed chunk raises ProtocolError naming it."""
    chunks = [c for c in msg.chunks if c.kind == kind]
    hidden, width, dtype = msg.hidden, msg.chunk_width, DTYPES[msg.dtype]
    count = math.ceil(hidden / width)
    if rows == 0:
        if chunks:
            raise ProtocolError(f"{len(chunks)} {kind} chunks arrived for a prompt with no {kind}", msg.id)
        return None
    out = torch.empty(rows, hidden, dtype=dtype)
    seen = set()
    for c in chunks:
        i, t = c.index, c.data
        if not 0 <= i < count:
            raise ProtocolError(f"{kind} chunk index {i!r} outside 0..{count - 1}", msg.id)
        if i in seen:
            raise ProtocolError(f"{kind} chunk {i} arrived twice", msg.id)
        seen.add(i)
        w = min(width, hidden - i * width)
        if tuple(t.shape) != (rows, w):
            raise ProtocolError(f"{kind} chunk {i} has shape {list(t.shape)}, expected {[rows, w]}", msg.id)
        if t.dtype != dtype:
            raise ProtocolError(f"{kind} chunk {i} is {DTYPE_NAMES[t.dtype]}, expected {msg.dtype}", msg.id)
        out[:, i * width : i * width + w] = t
    if len(seen) != count:
        missing = sorted(set(range(count)) - seen)
        raise ProtocolError(f"{kind} chunks {missing} of {count} are missing", msg.id)
    return out
