"""The two-process pipeline gives exactly transformers' greedy tokens; the queue survives bad chunks, can be
recorded and replayed; a dying worker is reported."""

import io
import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import zmq
from PIL import Image

from common.messages import Cancel, Finish, Ping, SamplingParams, TokenEntry, Tokens
from common.options import Options
from common.protocol import BROADCAST, VERSION, ProtocolError, decode, encode, topic
from frontend.pipeline import Pipeline, collect
from frontend.prompt import Prompter, user_message
from frontend.recording import read_recording
from visual_worker.preprocess import PreprocessConfig, preprocess_video

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)
PNG = {}
for name, (h, w) in {"small": (64, 64), "wide": (120, 500), "tall": (300, 200), "odd": (333, 517)}.items():
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    PNG[name] = buf.getvalue()
VIDEO = RNG.integers(0, 256, (5, 84, 112, 3), dtype=np.uint8)  # 5 frames → padded to 6, 3 temporal patches


def reference_tokens(reference, model_dir, prompt, images=(), video=None, fps=2.0, max_new_tokens=10):
    """transformers end to end: its tokenizer and chat template, its PIL image processor, its generate()."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = AutoTokenizer.from_pretrained(model_dir)
    content = [{"type": "image"} for _ in images] + ([{"type": "video"}] if video is not None else [])
    text = tok.apply_chat_template([{"role": "user", "content": content + [{"type": "text", "text": prompt}]}],
                                   tokenize=False, add_generation_prompt=True)
    kwargs = {}
    if images:
        processor = Qwen2VLImageProcessorPil.from_pretrained(model_dir)  # the checkpoint's min/max pixels
        out = processor(images=[Image.open(io.BytesIO(b)) for b in images], return_tensors="pt")
        for grid in out["image_grid_thw"]:
            text = text.replace("<|image_pad|>", "<|placeholder|>" * int(grid.prod() // 4), 1)
        kwargs.update(pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"])
    if video is not None:  # video pixels: ours, shown equal to transformers' video processor in test_preprocess
        pixels, grid, seconds = preprocess_video(list(video), fps, PreprocessConfig.from_dir(model_dir))
        text = text.replace("<|video_pad|>", "<|placeholder_v|>" * int(np.prod(grid) // 4), 1)
        kwargs.update(pixel_values_videos=torch.from_numpy(pixels), video_grid_thw=torch.as_tensor(grid),
                      second_per_grid_ts=torch.tensor([seconds]))
    text = text.replace("<|placeholder|>", "<|image_pad|>").replace("<|placeholder_v|>", "<|video_pad|>")
    input_ids = torch.tensor([tok(text)["input_ids"]])
    mm = (input_ids == 151655).int() + 2 * (input_ids == 151656).int()
    with torch.no_grad():
        out = reference.generate(input_ids=input_ids, mm_token_type_ids=mm, max_new_tokens=max_new_tokens,
                                 do_sample=False, **kwargs)
    return out[0, input_ids.shape[1]:].tolist()


def request(prompt, images=(), video=None, fps=2.0, max_new_tokens=10):
    """(messages, sampling) for the one request builder, Prompter.request."""
    return user_message(prompt, images, video, fps), SamplingParams(max_new_tokens=max_new_tokens)


def running_pipeline(model: Path, chunk_width: int):
    """Both workers as real processes, float32, prompts prefilled 16 tokens at a time (chunks cut through the image
    and video tokens, whose M-RoPE positions must carry across); yields ask(request) → the collected result."""
    pipeline = Pipeline(Options(model=model, dtype="float32", chunk_width=chunk_width, prefill_chunk=16))
    pipeline.start()
    pipeline.wait_ready()
    prompter = Prompter(model, pipeline.context_len)

    def ask(req) -> dict:
        return collect(pipeline, prompter.request(*req))

    ask.pipeline = pipeline
    yield ask
    pipeline.close()


@pytest.fixture(scope="module")
def pipeline(tiny_model):
    """For the whole module."""
    yield from running_pipeline(tiny_model, chunk_width=24)


CASES = {
    "small image": dict(prompt="What is this?", images=[PNG["small"]]),
    "wide image": dict(prompt="Describe it.", images=[PNG["wide"]]),
    "odd-sized image": dict(prompt="Describe it.", images=[PNG["odd"]]),
    "two images": dict(prompt="Compare them.", images=[PNG["tall"], PNG["small"]]),
    "video": dict(prompt="What happens?", video=VIDEO),
    "text only": dict(prompt="Hello world"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_pipeline_greedy_tokens_equal_transformers_generate(pipeline, reference, tiny_model, case):
    result = pipeline(request(**case))
    assert result["token_ids"] == reference_tokens(reference, tiny_model, **case)
    assert result["completion_tokens"] == len(result["token_ids"])
    assert set(result["timings"]) >= {"preprocess_s", "vit_s", "transport_s", "prefill_s", "decode_tokens_per_s"}


def test_a_corrupt_image_fails_that_request_alone(pipeline, reference, tiny_model):
    with pytest.raises(RuntimeError, match="image 1"):
        pipeline(request("What is this?", images=[b"\x89PNG\r\n\x1a\n not really a png"]))
    case = CASES["small image"]
    assert pipeline(request(**case))["token_ids"] == reference_tokens(reference, tiny_model, **case)


def run_launch(*args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "tall.png"
    path.write_bytes(PNG["tall"])
    return path


@pytest.mark.parametrize("width, chunks", [(64, 1), (24, 3), (11, 6)])
def test_launch_gives_transformers_tokens_for_any_chunk_width(tiny_model, reference, image_file, width, chunks):
    # hidden 64: width 24 → 24 + 24 + 16; width 11 → 5 × 11 + 9
    assert len(torch.zeros(1, 64).split(width, dim=1)) == chunks
    out = run_launch("--model", str(tiny_model), "--image", str(image_file), "--prompt", "Describe it.",
                     "--max-new-tokens", "8", "--dtype", "float32", "--chunk-width", str(width), "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    expected = reference_tokens(reference, tiny_model, "Describe it.", [PNG["tall"]], max_new_tokens=8)
    assert result["token_ids"] == expected
    assert result["prompt_tokens"] > 0 and result["finish_reason"] in ("stop", "length")


@pytest.fixture(scope="module")
def recording(tiny_model, image_file, tmp_path_factory):
    path = tmp_path_factory.mktemp("rec") / "run.qvl"
    out = run_launch("--model", str(tiny_model), "--image", str(image_file), "--prompt", "What is it?",
                     "--max-new-tokens", "12", "--dtype", "float32", "--chunk-width", "24", "--record", str(path),
                     "--json")
    assert out.returncode == 0, out.stderr
    return path, json.loads(out.stdout.strip().splitlines()[-1])


def test_replay_reproduces_the_recorded_run(tiny_model, recording):
    path, original = recording
    out = run_launch("replay", str(path), "--model", str(tiny_model), "--dtype", "float32", "--json")
    assert out.returncode == 0, out.stderr
    replayed = json.loads(out.stdout.strip().splitlines()[-1])
    assert replayed["token_ids"] == original["token_ids"] and replayed["text"] == original["text"]


def recording_variants(path: Path, out: Path) -> dict[str, tuple[Path, str]]:
    """Broken copies of a recording → (file, what `replay` must say)."""
    import msgpack

    data = path.read_bytes()
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    header, (frames, crc) = list(unpacker)[:2]
    variants = {
        "empty": (b"", "is empty: not a recording"),
        "not a recording": (b"hello, world", "is not a recording"),
        "another version": (msgpack.packb({**header, "protocol": 2}) + data[len(msgpack.packb(header)):],
                            "recorded with protocol version 2"),
        "truncated": (data[: len(data) - 50], "truncated"),
        "corrupted": (msgpack.packb(header) + msgpack.packb([[frames[0], frames[1][:-4] + b"\0\0\0\0", *frames[2:]], crc]),
                      "message 1 is corrupted (checksum mismatch)"),
        "no messages": (msgpack.packb(header), "holds no messages"),
    }
    written = {}
    for name, (content, message) in variants.items():
        file = out / f"{name.replace(' ', '_')}.qvl"
        file.write_bytes(content)
        written[name] = (file, message)
    return written


@pytest.mark.parametrize("variant", ["empty", "not a recording", "another version", "truncated", "corrupted",
                                     "no messages"])
def test_replay_refuses_a_broken_recording_saying_what_is_wrong(tiny_model, recording, tmp_path, variant):
    file, message = recording_variants(recording[0], tmp_path)[variant]
    start = time.monotonic()
    out = run_launch("replay", str(file), "--model", str(tiny_model), "--dtype", "float32", timeout=60)
    assert out.returncode == 1 and message in out.stderr, out.stderr
    assert time.monotonic() - start < 30  # refused before any worker starts


def test_replay_of_a_recording_holding_a_cancel_ends(tiny_model, recording, tmp_path):
    import msgpack

    from frontend.recording import _crc

    path, original = recording
    frames = read_recording(str(path))[0]
    cancel = encode(Cancel(decode(frames).id))
    file = tmp_path / "with_cancel.qvl"
    file.write_bytes(path.read_bytes() + msgpack.packb([cancel, _crc(cancel)]))
    out = run_launch("replay", str(file), "--model", str(tiny_model), "--dtype", "float32", "--json", timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["token_ids"] == original["token_ids"]


class ToLLM:
    """A PUB socket standing in for the visual worker, as `launch.py replay` does: it publishes under llm-0's topic,
    and routes every request it names to llm-0 so that the front end takes llm-0's answers."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        self.socket = zmq.Context.instance().socket(zmq.PUB)
        self.socket.bind(pipeline.endpoints.embeds[0])

    def send_multipart(self, frames) -> None:
        try:
            rid = getattr(decode(frames), "id", None)
        except ProtocolError as e:
            rid = e.request_id
        if rid is not None:
            self.pipeline.track(rid, "llm-0")
        self.socket.send_multipart([topic("llm-0"), *frames])


@pytest.fixture
def llm_alone(tiny_model):
    """An LLM worker fed by a PUB socket of the test's own, as `launch.py replay` does."""
    pipeline = Pipeline(Options(model=tiny_model, dtype="float32"))
    pub = ToLLM(pipeline)
    pipeline.start(("llm",))
    pipeline.wait_ready(("llm",), idle=lambda: pub.socket.send_multipart([BROADCAST, *encode(Ping())]))

    def send(frames) -> dict:
        return collect(pipeline, decode(frames), send=lambda _: pub.send_multipart(frames))

    send.pipeline, send.pub = pipeline, pub  # for tests that interleave their own messages
    yield send
    pipeline.close()


def header_of(frames: list[bytes]) -> dict:
    """An embeds message's header as plain msgpack data, to tamper with."""
    import msgspec

    return msgspec.msgpack.decode(frames[0])[1]


def reframed(header: dict, frames: list[bytes], data: dict[int, bytes] | None = None) -> list[bytes]:
    """The header (under a new id) with each chunk's tensor in a frame of its own, in the header's chunk order;
    `data` replaces the bytes of the chunk at that list position."""
    import msgspec

    header = {**header, "id": uuid.uuid4().hex, "chunks": [list(c) for c in header["chunks"]]}
    out = []
    for i, chunk in enumerate(header["chunks"]):
        tensor = list(chunk[2])
        out.append((data or {}).get(i, frames[tensor[3]]))
        chunk[2] = [*tensor[:3], len(out)]
    return [msgspec.msgpack.encode([VERSION, header]), *out]


def tampered(frames: list[bytes], reorder) -> list[bytes]:
    """The recorded embeds message with its chunks rearranged, under a new id."""
    header = header_of(frames)
    return reframed({**header, "chunks": [header["chunks"][i] for i in reorder(list(range(len(header["chunks"]))))]},
                    frames)


def test_chunks_out_of_order_are_reassembled(llm_alone, recording):
    path, original = recording
    frames = read_recording(str(path))[0]
    assert len(frames) - 1 == 3  # hidden 64 in chunks of 24
    assert llm_alone(tampered(frames, lambda idx: idx[::-1]))["token_ids"] == original["token_ids"]


@pytest.mark.parametrize("how, error", [
    (lambda idx: idx + idx[:1], "chunk 0 arrived twice"),
    (lambda idx: idx[:-1], r"chunks \[2\] of 3 are missing"),
])
def test_a_duplicate_or_missing_chunk_fails_that_request_and_the_next_succeeds(llm_alone, recording, how, error):
    path, original = recording
    frames = read_recording(str(path))[0]
    with pytest.raises(RuntimeError, match=error):
        llm_alone(tampered(frames, how))
    assert llm_alone(tampered(frames, lambda idx: idx))["token_ids"] == original["token_ids"]


def test_a_mis_sized_or_mis_typed_chunk_fails_that_request(llm_alone, recording):
    path, _ = recording
    frames = read_recording(str(path))[0]
    header = header_of(frames)
    kind, index, (_, dtype, (rows, width), frame) = header["chunks"][1]
    short = {**header, "chunks": [*header["chunks"][:1], [kind, index, ["tensor", dtype, [rows, width - 1], frame]],
                                  *header["chunks"][2:]]}
    cut = frames[frame][: rows * (width - 1) * 4]
    with pytest.raises(RuntimeError, match=rf"chunk 1 has shape \[{rows}, {width - 1}\], expected \[{rows}, {width}\]"):
        llm_alone(reframed(short, frames, {1: cut}))
    typed = {**header, "chunks": [*header["chunks"][:1], [kind, index, ["tensor", "bfloat16", [rows, width], frame]],
                                  *header["chunks"][2:]]}
    as_bf16 = torch.frombuffer(bytearray(frames[frame]), dtype=torch.float32).to(torch.bfloat16).view(torch.uint8)
    with pytest.raises(RuntimeError, match="chunk 1 is bfloat16, expected float32"):
        llm_alone(reframed(typed, frames, {1: as_bf16.numpy().tobytes()}))


def test_a_cancel_stops_a_decoding_request_frees_its_row_and_is_acknowledged(llm_alone, recording):
    path, original = recording
    frames = read_recording(str(path))[0]
    header = header_of(frames)
    endless = reframed({**header, "sampling": {**header["sampling"], "max_new_tokens": 100_000, "ignore_eos": True}},
                       frames)
    rid = decode(endless).id
    pipeline, pub = llm_alone.pipeline, llm_alone.pub
    pub.send_multipart(endless)
    while (event := pipeline.receive(timeout_s=60)[0]).id != rid:
        pass
    assert isinstance(event, TokenEntry)  # decoding is under way
    pub.send_multipart(encode(Cancel(rid, "llm-0")))
    result = collect(pipeline, decode(endless), send=lambda _: None)
    assert result["finish_reason"] == "cancelled" and 1 <= result["completion_tokens"] < 1000
    assert llm_alone(tampered(frames, lambda idx: idx))["token_ids"] == original["token_ids"]


def test_requests_decoded_together_share_one_tokens_message_a_step(llm_alone, recording):
    path, original = recording
    frames = read_recording(str(path))[0]
    first, second = tampered(frames, lambda idx: idx), tampered(frames, lambda idx: idx)
    tokens = {decode(first).id: [], decode(second).id: []}
    llm_alone.pub.send_multipart(first)
    llm_alone.pub.send_multipart(second)
    together, finished = 0, set()
    while len(finished) < 2:
        batch = llm_alone.pipeline.receive(timeout_s=60)
        assert batch is not None and all(isinstance(m, (TokenEntry, Finish)) for m in batch), batch
        together += {m.id for m in batch if isinstance(m, TokenEntry)} == set(tokens)
        for m in batch:
            if isinstance(m, TokenEntry):
                tokens[m.id] += m.token_ids
            else:
                finished.add(m.id)
    assert together >= len(original["token_ids"]) // 2  # most steps carried both requests
    assert all(t == original["token_ids"] for t in tokens.values())


def test_a_malformed_tokens_entry_is_a_protocol_error():
    import msgspec

    good = Tokens([TokenEntry("a", [1], "x"), TokenEntry("b", [2], "")])
    assert decode(encode(good)).requests == good.requests
    bad = msgspec.msgpack.encode([VERSION, {"type": "tokens", "requests": [["a", 1, "x"]]}])
    with pytest.raises(ProtocolError, match=r"Expected `array`, got `int` - at `\$.requests\[0\]\[1\]`"):
        decode([bad])


@pytest.mark.parametrize("frames", [
    [b""], [b"\xc1"], [b"\x92\x03\xc0"], [encode(Ping())[0], b"stray frame"],
    [b"\x92\x03\x83\xa4type\xa6embeds\xa2id\xa3bad\xaaprompt_ids\xa1x"],  # an embeds message with a bad field
], ids=["empty frame", "not msgpack", "nil message", "stray frame", "bad field"])
def test_malformed_embeds_messages_leave_the_llm_worker_serving(llm_alone, recording, frames):
    _, original = recording
    llm_alone.pub.send_multipart(frames)
    good = tampered(read_recording(str(recording[0]))[0], lambda idx: idx)
    assert llm_alone(good)["token_ids"] == original["token_ids"]
    llm_alone.pipeline.check()  # alive and heartbeating


def test_a_named_but_malformed_embeds_message_fails_its_own_request(llm_alone):
    import msgspec

    from types import SimpleNamespace

    bad = [msgspec.msgpack.encode([VERSION, {"type": "embeds", "id": "mine", "prompt_ids": "x"}])]
    with pytest.raises(RuntimeError, match=r"malformed message: Expected `array`, got `str` - at `\$.prompt_ids`"):
        collect(llm_alone.pipeline, SimpleNamespace(id="mine"), send=lambda _: llm_alone.pub.send_multipart(bad))


def test_malformed_requests_leave_the_visual_worker_serving(pipeline, reference, tiny_model):
    import msgspec

    for frames in ([b"\xc1"], [msgspec.msgpack.encode([VERSION, {"type": "request", "id": "q", "media": 5}])],
                   encode(Ping())):
        pipeline.pipeline.requests.send_multipart([b"visual-0", *frames])
    case = CASES["small image"]
    assert pipeline(request(**case))["token_ids"] == reference_tokens(reference, tiny_model, **case)


def test_killing_the_llm_worker_mid_request_is_reported_and_leaves_no_process(tiny_model, image_file):
    proc = subprocess.Popen(
        [sys.executable, "launch.py", "--model", str(tiny_model), "--image", str(image_file),
         "--prompt", "Go on.", "--max-new-tokens", "4000", "--dtype", "float32"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    launcher = psutil.Process(proc.pid)
    deadline = time.monotonic() + 120
    llm = None
    while llm is None and time.monotonic() < deadline:  # wait until the LLM worker is generating
        time.sleep(0.5)
        workers = {p: p.cmdline() for p in launcher.children()}
        llm = next((p for p, cmd in workers.items() if "llm_worker" in cmd), None)
    children = launcher.children(recursive=True)
    proc.stdout.read(1)  # the first streamed character: generation is under way
    llm.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "the llm-0 worker died" in stderr
    time.sleep(1)
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
