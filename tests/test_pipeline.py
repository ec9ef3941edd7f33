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
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import torch
import zmq
from PIL import Image

from frontend.client import Frontend, per_request, read_recording
from common.protocol import Message, ProtocolError, decode
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


def request(prompt, images=(), video=None, fps=2.0, max_new_tokens=10) -> Message:
    content = [{"type": "image"} for _ in images]
    tensors = [({"name": "image"}, torch.frombuffer(bytearray(b), dtype=torch.uint8)) for b in images]
    if video is not None:
        content.append({"type": "video", "fps": fps})
        tensors.append(({"name": "video"}, torch.from_numpy(video)))
    fields = {"messages": [{"role": "user", "content": content + [{"type": "text", "text": prompt}]}],
              "sampling": {"max_new_tokens": max_new_tokens}}
    return Message("request", uuid.uuid4().hex, fields, tensors)


def running_pipeline(model: Path, chunk_width: int):
    """Both workers as real processes, float32; yields ask(request message) → the collected result."""
    front = Frontend("ipc")
    args = SimpleNamespace(model=model, dtype="float32", visual_device="cpu", llm_device="cpu", chunk_width=chunk_width)
    front.start_workers(args, visual=True)
    front.wait_ready({"visual", "llm"})

    def ask(msg: Message) -> dict:
        front.requests.send_multipart(msg.encode())
        return front.collect(msg.id, io.StringIO())

    yield ask
    front.close()


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


@pytest.fixture
def llm_alone(tiny_model):
    """An LLM worker fed by a PUB socket of the test's own, as `launch.py replay` does."""
    front = Frontend("ipc")
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.bind(front.endpoints["embeds"])
    front.start_workers(SimpleNamespace(model=tiny_model, dtype="float32", llm_device="cpu"), visual=False)
    while (msg := front.receive(timeout_s=0.2)) is None or msg.type != "ready":
        pub.send_multipart(Message("ping", "", {}).encode())

    def send(frames) -> dict:
        pub.send_multipart(frames)
        return front.collect(decode(frames).id, io.StringIO())

    send.front, send.pub = front, pub  # for tests that interleave their own messages
    yield send
    front.close()


def tampered(frames: list[bytes], reorder) -> list[bytes]:
    """The recorded embeds message with its chunk frames (and their descriptors) rearranged, under a new id."""
    import msgpack

    header = msgpack.unpackb(frames[0])
    order = reorder(list(range(len(frames) - 1)))
    header["tensors"] = [header["tensors"][i] for i in order]
    header["id"] = uuid.uuid4().hex
    return [msgpack.packb(header)] + [frames[1 + i] for i in order]


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
    import msgpack

    path, _ = recording
    frames = read_recording(str(path))[0]
    header = msgpack.unpackb(frames[0])
    rows, width = header["tensors"][1]["shape"]
    short = dict(header, id=uuid.uuid4().hex)
    short["tensors"] = [*header["tensors"][:1], {**header["tensors"][1], "shape": [rows, width - 1]}, *header["tensors"][2:]]
    cut = frames[2][: rows * (width - 1) * 4]
    with pytest.raises(RuntimeError, match=rf"chunk 1 has shape \[{rows}, {width - 1}\], expected \[{rows}, {width}\]"):
        llm_alone([msgpack.packb(short), frames[1], cut, *frames[3:]])
    typed = dict(header, id=uuid.uuid4().hex)
    typed["tensors"] = [*header["tensors"][:1], {**header["tensors"][1], "dtype": "bfloat16"}, *header["tensors"][2:]]
    as_bf16 = torch.frombuffer(bytearray(frames[2]), dtype=torch.float32).to(torch.bfloat16).view(torch.uint8)
    with pytest.raises(RuntimeError, match="chunk 1 is bfloat16, expected float32"):
        llm_alone([msgpack.packb(typed), frames[1], as_bf16.numpy().tobytes(), *frames[3:]])


def test_a_cancel_stops_a_decoding_request_frees_its_row_and_is_acknowledged(llm_alone, recording):
    import msgpack

    path, original = recording
    frames = read_recording(str(path))[0]
    header = msgpack.unpackb(frames[0])
    header["fields"]["sampling"].update(max_new_tokens=100_000, ignore_eos=True)
    endless = [msgpack.packb(header), *frames[1:]]
    front, pub = llm_alone.front, llm_alone.pub
    pub.send_multipart(endless)
    while (msg := front.receive(timeout_s=60)).id != header["id"]:
        pass
    assert msg.type == "token"  # decoding is under way
    pub.send_multipart(Message("cancel", header["id"], {}).encode())
    result = front.collect(header["id"], io.StringIO())
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
        batch = llm_alone.front.receive_batch(timeout_s=60)
        assert batch is not None and all(m.type in ("token", "finish") for m in batch), batch
        together += {m.id for m in batch if m.type == "token"} == set(tokens)
        for m in batch:
            if m.type == "token":
                tokens[m.id] += m.fields["token_ids"]
            else:
                finished.add(m.id)
    assert together >= len(original["token_ids"]) // 2  # most steps carried both requests
    assert all(t == original["token_ids"] for t in tokens.values())


def test_a_malformed_tokens_entry_is_a_protocol_error():
    good = Message("tokens", "", {"requests": [["a", [1], "x"], ["b", [2], ""]]})
    assert [(m.type, m.id, m.fields) for m in per_request(good)] == [
        ("token", "a", {"token_ids": [1], "text": "x"}), ("token", "b", {"token_ids": [2], "text": ""})]
    with pytest.raises(ProtocolError, match="an entry must be"):
        per_request(Message("tokens", "", {"requests": [["a", 1, "x"]]}))


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
    assert "the llm worker died" in stderr
    time.sleep(1)
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
