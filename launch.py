"""Starts the visual worker and the LLM worker as separate processes joined by ZeroMQ, sends them a request and
streams the answer; `replay FILE` feeds a recorded queue into a fresh LLM worker.

    python launch.py                                   # embedded default model, bundled example image
    python launch.py --model DIR --image cat.jpg --prompt "What is this?" [--json]
    python launch.py replay run.qvl [--json]
"""

import argparse
import base64
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import msgpack
import numpy as np
import torch
import zmq

from common.protocol import Message, ProtocolError, decode

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE / "examples" / "model"
DEFAULT_IMAGE = HERE / "examples" / "images" / "shapes.png"
DEFAULT_PROMPT = "What colour is the triangle?"
READY_TIMEOUT_S = 300


class WorkerDied(RuntimeError):
    pass


class Workers:
    """Worker subprocesses that die with this process; `check` raises WorkerDied naming one that has exited."""

    def __init__(self):
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, module: str, *args: str) -> None:
        cmd = [sys.executable, "-m", module, *args, "--exit-with-parent"]
        self.procs[name] = subprocess.Popen(cmd, cwd=HERE)

    def check(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise WorkerDied(f"the {name} worker died (exit code {p.returncode})")

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class Frontend:
    """The requester's side: binds the requests and results sockets, and reads results while watching the workers."""

    def __init__(self, transport: str):
        self.dir = tempfile.mkdtemp(prefix="qvl-")
        ctx = zmq.Context.instance()
        self.requests = ctx.socket(zmq.PUSH)
        self.results = ctx.socket(zmq.PULL)
        self.endpoints = {}
        for name, sock in (("requests", self.requests), ("results", self.results)):
            self.endpoints[name] = self._bind(sock, name, transport)
        self.endpoints["embeds"] = self._free_endpoint("embeds", transport)
        self.workers = Workers()

    def _bind(self, sock, name: str, transport: str) -> str:
        if transport == "ipc":
            sock.bind(f"ipc://{self.dir}/{name}")
        else:
            sock.bind("tcp://127.0.0.1:*")
        return sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def _free_endpoint(self, name: str, transport: str) -> str:
        if transport == "ipc":
            return f"ipc://{self.dir}/{name}"
        probe = zmq.Context.instance().socket(zmq.PUSH)
        probe.bind("tcp://127.0.0.1:*")
        endpoint = probe.getsockopt_string(zmq.LAST_ENDPOINT)
        probe.close(linger=0)
        return endpoint

    def receive(self, timeout_s: float | None = None) -> Message | None:
        """Next result message, checking the workers every 200 ms; None after timeout_s."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.results.poll(200):
            self.workers.check()
            if deadline is not None and time.monotonic() > deadline:
                return None
        return decode(self.results.recv_multipart())

    def wait_ready(self, names: set[str], recorder=None) -> None:
        waiting = set(names)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while waiting or (recorder is not None and not recorder.live):
            if recorder is not None:
                recorder.poll()
            msg = self.receive(timeout_s=0.2)
            if msg is not None and msg.type == "ready":
                waiting.discard(msg.fields["worker"])
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers {sorted(waiting)} not ready after {READY_TIMEOUT_S} s")

    def collect(self, request_id: str, out, recorder=None) -> dict:
        """Streams one request's text to `out`; returns the result (text, token ids, counts, timings)."""
        text, token_ids = [], []
        while True:
            if recorder is not None:
                recorder.poll()
            msg = self.receive()
            if msg.id != request_id:
                continue
            if msg.type == "error":
                raise RuntimeError(msg.fields["message"])
            if msg.type == "token":
                token_ids += msg.fields["token_ids"]
                text.append(msg.fields["text"])
                out.write(msg.fields["text"])
                out.flush()
            if msg.type == "finish":
                if recorder is not None:
                    recorder.drain()
                return {"text": "".join(text), "token_ids": token_ids, **msg.fields}

    def close(self) -> None:
        self.workers.stop()


class Recorder:
    """Subscribes to the embeds queue and writes every embeds message to a file (one msgpack list of frames each)."""

    def __init__(self, endpoint: str, path: str):
        self.sub = zmq.Context.instance().socket(zmq.SUB)
        self.sub.connect(endpoint)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.file = open(path, "wb")
        self.live = False  # a ping has arrived: the subscription is in place

    def poll(self) -> None:
        while self.sub.poll(0):
            frames = self.sub.recv_multipart()
            kind = decode(frames).type
            self.live = True
            if kind == "embeds":
                self.file.write(msgpack.packb(frames))
                self.file.flush()

    def drain(self) -> None:
        self.poll()


def read_recording(path: str) -> list[list[bytes]]:
    with open(path, "rb") as f:
        return list(msgpack.Unpacker(f, max_buffer_size=2**31))


def fetch(source: str) -> bytes:
    """Bytes of an image given as a path, an http(s) URL or a data URI."""
    if source.startswith("data:"):
        header, _, payload = source.partition(",")
        if ";base64" not in header:
            raise ValueError("data URIs must be base64-encoded (data:image/png;base64,...)")
        return base64.b64decode(payload)
    if source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source, timeout=30) as r:
            return r.read()
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"image {source} not found")
    return path.read_bytes()


def read_video(source: str, fps: float) -> np.ndarray:
    """(T, H, W, 3) uint8 frames: a folder of frame images (taken as sampled at `fps`), or a video file sampled
    at `fps` frames per second (decoded with PyAV)."""
    from PIL import Image

    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".webp"})
        if not files:
            raise ValueError(f"no frame images in {source}")
        return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])
    import av

    frames, next_t = [], 0.0
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            if frame.time is not None and frame.time + 1e-6 < next_t:
                continue
            frames.append(frame.to_ndarray(format="rgb24"))
            next_t += 1.0 / fps
    if not frames:
        raise ValueError(f"no frames decoded from {source}")
    return np.stack(frames)


def build_request(args) -> Message:
    content = [{"type": "image"} for _ in args.image]
    tensors = [({"name": "image"}, torch.frombuffer(bytearray(fetch(s)), dtype=torch.uint8)) for s in args.image]
    if args.video:
        content.append({"type": "video", "fps": args.fps})
        tensors.append(({"name": "video"}, torch.from_numpy(read_video(args.video, args.fps))))
    content.append({"type": "text", "text": args.prompt})
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "top_k": args.top_k, "seed": args.seed}
    fields = {"messages": [{"role": "user", "content": content}], "sampling": sampling,
              "min_pixels": args.min_pixels, "max_pixels": args.max_pixels}
    return Message("request", uuid.uuid4().hex, fields, tensors)


def start_workers(front: Frontend, args, visual: bool) -> None:
    common = ["--model", str(args.model), "--results", front.endpoints["results"], "--embeds", front.endpoints["embeds"]]
    dtype = ["--dtype", args.dtype] if args.dtype else []
    if visual:
        front.workers.start("visual", "visual_worker", *common, *dtype, "--device", args.visual_device,
                            "--requests", front.endpoints["requests"], "--chunk-width", str(args.chunk_width))
    front.workers.start("llm", "llm_worker", *common, *dtype, "--device", args.llm_device)


def print_result(result: dict, as_json: bool) -> None:
    print()
    if as_json:
        print(json.dumps(result))
    else:
        t = result["timings"]
        print(f"[{result['finish_reason']}: {result['prompt_tokens']} prompt + {result['completion_tokens']} "
              f"generated tokens; " + ", ".join(f"{k} {v:.3f}" for k, v in t.items()) + "]", file=sys.stderr)


def run(args) -> int:
    front = Frontend(args.transport)
    try:
        start_workers(front, args, visual=True)
        recorder = Recorder(front.endpoints["embeds"], args.record) if args.record else None
        front.wait_ready({"visual", "llm"}, recorder)
        request = build_request(args)
        front.requests.send_multipart(request.encode())
        print_result(front.collect(request.id, sys.stdout, recorder), args.json)
        return 0
    finally:
        front.close()


def replay(args) -> int:
    recording = read_recording(args.file)
    front = Frontend(args.transport)
    try:
        pub = zmq.Context.instance().socket(zmq.PUB)
        pub.bind(front.endpoints["embeds"])
        start_workers(front, args, visual=False)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:  # the LLM worker reports ready once a ping has reached it
            pub.send_multipart(Message("ping", "", {}).encode())
            msg = front.receive(timeout_s=0.2)
            if msg is not None and msg.type == "ready":
                break
            if time.monotonic() > deadline:
                raise TimeoutError("the LLM worker did not become ready")
        for frames in recording:
            pub.send_multipart(frames)
            print_result(front.collect(decode(frames).id, sys.stdout), args.json)
        return 0
    finally:
        front.close()


def worker_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint directory (default: embedded demo)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's dtype")
    p.add_argument("--visual-device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--llm-device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--chunk-width", type=int, default=640, help="image_embeds chunk width along hidden")
    p.add_argument("--transport", choices=["ipc", "tcp"], default="ipc", help="ipc:// sockets or tcp://127.0.0.1")
    p.add_argument("--json", action="store_true", help="last line of stdout: the result as one JSON object")


def main(argv: list[str]) -> int:
    if argv[:1] == ["replay"]:
        p = argparse.ArgumentParser(prog="launch.py replay", description="replay a recorded queue into a fresh LLM worker")
        p.add_argument("file")
        worker_options(p)
        return replay(p.parse_args(argv[1:]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    worker_options(p)
    p.add_argument("--image", action="append", default=None, help="path, http(s) URL or data URI; repeatable")
    p.add_argument("--video", help="video file (decoded with PyAV) or a folder of frame images")
    p.add_argument("--fps", type=float, default=2.0, help="video frames per second to sample")
    p.add_argument("--prompt", default=None)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--min-pixels", type=int)
    p.add_argument("--max-pixels", type=int)
    p.add_argument("--record", help="write the embeds queue to this file for `launch.py replay`")
    args = p.parse_args(argv)
    if args.image is None:
        args.image = [] if (args.video or args.prompt) else [str(DEFAULT_IMAGE)]
    args.prompt = args.prompt if args.prompt is not None else DEFAULT_PROMPT
    return run(args)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
    except (WorkerDied, RuntimeError, ValueError, FileNotFoundError, TimeoutError, ProtocolError) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        sys.exit(1)
