"""The wire protocol on its own: every message round-trips exactly, and every way a message can be wrong (version,
framing, a field's type or range, a tensor's dtype, shape or byte count, a frame named twice or not at all) is a
ProtocolError that says what, naming the request when the header did. Fuzzed: no input raises anything else."""

import contextlib
import math

import msgspec
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.messages import (Alive, Blob, Cancel, Chunk, Embeds, Error, Finish, Heartbeat, Image, Ping, PixelLimits, Ready,
                             Request, SamplingParams, TokenEntry, Tokens, Video)
from common.protocol import VERSION, ProtocolError, assemble_chunks, decode, decode_sent, encode, hidden_chunks


def wire(msg) -> list[bytes]:
    """What a socket delivers: every frame as bytes."""
    return [bytes(f) for f in encode(msg)]


def raw(body: dict, *frames: bytes, version: int = VERSION) -> list[bytes]:
    """A hand-made message: header [version, body] and the given data frames."""
    return [msgspec.msgpack.encode([version, body]), *frames]


def embeds(rid="r1", hidden=10, width=4, rows=3, dtype=torch.float32) -> Embeds:
    x = torch.arange(rows * hidden, dtype=torch.float32).reshape(rows, hidden).to(dtype)
    return Embeds(rid, [1, 151655, 2], [(1, 2, 2 * rows)], [], [], SamplingParams(), hidden, width,
                  str(dtype).removeprefix("torch."), hidden_chunks("image", x, width), {"vit_s": 0.5})


MESSAGES = {
    "request": Request("r1", [1, 151655, 151656, 2],
                       [Image(Blob(b"\x89PNG...")), Video(torch.arange(24, dtype=torch.uint8).reshape(1, 2, 4, 3), 2.0)],
                       SamplingParams(max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=3, seed=4, stop=("x",)),
                       PixelLimits(3136, 100_000), max_prompt_tokens=4000),
    "embeds": embeds(),
    "tokens": Tokens([TokenEntry("a", [1], "x"), TokenEntry("b", [2, 3], "")]),
    "finish": Finish("r1", "length", 10, 5, {"prefill_s": 0.1}),
    "error": Error("r1", "ValueError: bad image", 400),
    "ready": Ready("325816f6e6e21f7d", "cuda:1", 8, 4096),
    "heartbeat": Heartbeat(123, 0.25, ["llm-0", "llm-1"]),
    "alive": Alive(456, ["ipc:///tmp/qvl-x/embeds-0"]),
    "ping": Ping(),
    "cancel": Cancel("r1", "llm-1"),
}


def same(a, b) -> bool:
    """Structs equal field by field, tensors by value and dtype."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, msgspec.Struct):
        return type(a) is type(b) and all(same(getattr(a, f), getattr(b, f)) for f in a.__struct_fields__)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", MESSAGES)
def test_every_message_round_trips_exactly(name):
    msg = MESSAGES[name]
    assert same(decode(wire(msg)), msg)


def test_tensors_and_blobs_travel_as_frames_of_their_own_not_in_the_header():
    frames = encode(MESSAGES["request"])
    assert len(frames) == 3  # header, the image's bytes, the video's frames
    assert bytes(frames[1]) == b"\x89PNG..."
    assert b"\x89PNG" not in bytes(frames[0]) and len(frames[0]) < 400


def test_a_message_from_another_protocol_version_is_refused_naming_both():
    body = msgspec.msgpack.decode(wire(Cancel("r7"))[0])[1]
    with pytest.raises(ProtocolError, match=rf"protocol version 2, this build speaks {VERSION}") as e:
        decode(raw(body, version=2))
    assert e.value.request_id == "r7"


@pytest.mark.parametrize("frames, message", [
    ([], "empty message"),
    ([b"\xc1"], "not \\[version, message\\] msgpack"),
    ([msgspec.msgpack.encode({"type": "ping"})], "not \\[version, message\\] msgpack"),
    (raw({"type": "nonsense", "id": "r"}), "Invalid value 'nonsense' - at `\\$.type`"),
    (raw({"id": "r"}), "missing required field `type`"),
], ids=["no frames", "not msgpack", "no version", "unknown type", "no type"])
def test_a_broken_header_is_a_protocol_error(frames, message):
    with pytest.raises(ProtocolError, match=message):
        decode(frames)


@pytest.mark.parametrize("field, value, message", [
    ("id", 5, r"Expected `str`, got `int` - at `\$.id`"),
    ("prompt_ids", [1, -1], r"Expected `int` >= 0 - at `\$.prompt_ids\[1\]`"),
    ("prompt_ids", "1 2", r"Expected `array`, got `str` - at `\$.prompt_ids`"),
    ("sampling", {"max_new_tokens": 0}, r"Expected `int` >= 1 - at `\$.sampling.max_new_tokens`"),
    ("sampling", {"max_new_tokens": 2**40}, r"Expected `int` <= 2147483647 - at `\$.sampling.max_new_tokens`"),
    ("sampling", {"temperature": -1.0}, r"Expected `float` >= 0.0 - at `\$.sampling.temperature`"),
    ("sampling", {"top_p": 0.0}, r"Expected `float` > 0.0 - at `\$.sampling.top_p`"),
    ("sampling", {"stop": [""]}, r"Expected `str` of length >= 1 - at `\$.sampling.stop\[0\]`"),
    ("sampling", {"surprise": 1}, r"Object contains unknown field `surprise` - at `\$.sampling`"),
    ("media", [{"type": "audio"}], r"Invalid value 'audio' - at `\$.media\[0\].type`"),
    ("pixels", {"min_pixels": 0}, r"Expected `int` >= 1 - at `\$.pixels.min_pixels`"),
    ("llm", "visual-0", r"Expected `str` matching regex .* - at `\$.llm`"),
], ids=["id", "negative token", "ids not a list", "zero tokens", "huge tokens", "negative temperature", "zero top_p",
        "empty stop", "unknown sampling field", "unknown media", "zero pixels", "llm not an LLM worker's name"])
def test_every_field_of_a_request_is_checked_against_its_type(field, value, message):
    body = msgspec.msgpack.decode(wire(Request("r9", [1], [], SamplingParams()))[0])[1]
    body[field] = value
    with pytest.raises(ProtocolError, match=message) as e:
        decode(raw(body))
    assert e.value.request_id == ("r9" if field != "id" else None)


def test_a_message_to_the_front_end_names_its_sender_in_a_frame_of_its_own():
    assert decode_sent([b"llm-3", *wire(Heartbeat(7))]) == ("llm-3", Heartbeat(7))
    for sender, message in [(b"mallory", "not a worker name"), (b"llm-", "not a worker name"),
                            (b"\xff", "not a worker name")]:
        with pytest.raises(ProtocolError, match=message):
            decode_sent([sender, *wire(Heartbeat(7))])
    with pytest.raises(ProtocolError, match="starts with a frame naming its sender"):
        decode_sent(wire(Heartbeat(7)))


@pytest.mark.parametrize("change, message", [
    (lambda b: b.update(code=418), r"Invalid enum value 418 - at `\$.code`"),
    (lambda b: b.update(extra=1), r"unknown field `extra`"),
    (lambda b: b.pop("message"), r"missing required field `message`"),
], ids=["forged error code", "unknown field", "missing field"])
def test_a_forged_or_malformed_error_message_is_refused(change, message):
    body = msgspec.msgpack.decode(wire(Error("r1", "x", 400))[0])[1]
    change(body)
    with pytest.raises(ProtocolError, match=message):
        decode(raw(body))


def test_a_finish_reason_outside_the_known_ones_is_refused():
    body = msgspec.msgpack.decode(wire(MESSAGES["finish"])[0])[1]
    body["finish_reason"] = "<script>"
    with pytest.raises(ProtocolError, match=r"at `\$.finish_reason`"):
        decode(raw(body))


def embeds_parts():
    frames = wire(embeds())
    return msgspec.msgpack.decode(frames[0])[1], frames[1:]


@pytest.mark.parametrize("descriptor, message", [
    (["tensor", "complex64", [3, 4], 1], "tensor dtype 'complex64' is not one of"),
    (["tensor", "float32", [3, -4], 1], "must be at most 8 non-negative sizes"),
    (["tensor", "float32", [1] * 9, 1], "must be at most 8 non-negative sizes"),
    (["tensor", "float32", [3, 5], 1], r"tensor float32\[3, 5\] needs 60 bytes, its frame has 48"),
    (["tensor", "float32", [3, 4], 9], "frame 9 is not one of the message's 3 data frames"),
    (["tensor", "float32", [3, 4], 0], "frame 0 is not one of"),
    (["blob", 1], "expected a tensor descriptor"),
    ("not a tensor", "expected a tensor descriptor"),
], ids=["dtype", "negative size", "too many dims", "byte count", "frame past the end", "the header frame",
        "blob for tensor", "string"])
def test_a_bad_tensor_descriptor_is_a_protocol_error_naming_where(descriptor, message):
    body, data = embeds_parts()
    body["chunks"][0][2] = descriptor
    with pytest.raises(ProtocolError, match=message) as e:
        decode(raw(body, *data))
    assert e.value.request_id == "r1"


def test_a_frame_named_twice_is_refused():
    body, data = embeds_parts()
    body["chunks"][1][2][3] = body["chunks"][0][2][3]
    with pytest.raises(ProtocolError, match="frame 1 is named twice"):
        decode(raw(body, *data))


def test_a_frame_the_header_does_not_name_is_refused():
    body, data = embeds_parts()
    with pytest.raises(ProtocolError, match="1 of its 4 data frames are not named by the header"):
        decode(raw(body, *data, b"extra"))


def test_chunks_reassemble_by_index_whatever_their_order():
    msg = embeds(hidden=10, width=4, rows=3)
    reference = torch.arange(30, dtype=torch.float32).reshape(3, 10)
    assert [c.data.shape[1] for c in msg.chunks] == [4, 4, 2]
    msg.chunks.reverse()
    assert torch.equal(assemble_chunks(decode(wire(msg)), "image", 3), reference)


@pytest.mark.parametrize("tamper, message", [
    (lambda c: c.append(c[0]), "image chunk 0 arrived twice"),
    (lambda c: c.pop(), r"image chunks \[2\] of 3 are missing"),
    (lambda c: c.__setitem__(1, Chunk("image", 7, c[1].data)), "image chunk index 7 outside 0..2"),
    (lambda c: c.__setitem__(1, Chunk("image", 1, c[1].data[:, :3])), r"image chunk 1 has shape \[3, 3\], expected \[3, 4\]"),
    (lambda c: c.__setitem__(1, Chunk("image", 1, c[1].data.half())), "image chunk 1 is float16, expected float32"),
    (lambda c: c.append(Chunk("video", 0, c[0].data)), None),  # a video chunk for a prompt with no video
], ids=["duplicate", "missing", "index", "shape", "dtype", "stray video"])
def test_a_wrong_chunk_is_named(tamper, message):
    msg = embeds(hidden=10, width=4, rows=3)
    tamper(msg.chunks)
    arrived = decode(wire(msg))
    if message is None:
        with pytest.raises(ProtocolError, match="1 video chunks arrived for a prompt with no video"):
            assemble_chunks(arrived, "video", 0)
        return
    with pytest.raises(ProtocolError, match=message):
        assemble_chunks(arrived, "image", 3)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be in 1.."),
    ({"temperature": math.nan}, "temperature must be in"),
    ({"temperature": -0.5}, "temperature must be in"),
    ({"top_p": 1.5}, "top_p must be in"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"seed": -3}, "seed must be in"),
    ({"stop": ("",)}, "stop must be a list of non-empty strings"),
    ({"stop": tuple("abcdefghijklmnopq")}, "at most 16 stop strings"),
])
def test_sampling_params_built_in_python_are_checked_too(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


# ---- fuzzing: whatever arrives, decode either returns a message or raises ProtocolError ----

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)


def mutated_headers():
    """Real message headers with one field replaced by an arbitrary value, or arbitrary bytes."""
    bodies = [msgspec.msgpack.decode(wire(m)[0])[1] for m in MESSAGES.values()]

    def mutate(body, key, value):
        body = dict(body)
        body[key] = value
        return msgspec.msgpack.encode([VERSION, body])

    real = st.sampled_from(bodies).flatmap(
        lambda b: st.tuples(st.just(b), st.sampled_from(sorted(b)), msgpack_values)).map(lambda t: mutate(*t))
    return real | st.binary(max_size=64) | msgpack_values.map(lambda v: msgspec.msgpack.encode(v))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=mutated_headers(), frames=st.lists(st.binary(max_size=64), max_size=4))
def test_fuzzed_messages_decode_or_raise_protocol_error_only(header, frames):
    with contextlib.suppress(ProtocolError):  # any other exception fails the test
        decode([header, *frames])
