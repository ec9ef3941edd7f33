"""The requester's side of the pipeline: starts worker processes, binds the requests and results sockets,
turns user inputs (paths, URLs, data URIs, video files) into request messages, and records the embeds queue."""

import base64
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from pathlib import Path

import msgpack
import numpy as np
import zmq

from common.protocol import Message, ProtocolError, decode

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 300


class WorkerDied(RuntimeError):
    pass


class Workers:
    """Worker subprocesses that die with this process; `check` raises WorkerDied naming one that has exited."""

    def __init__(self):
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, module: str, *args: str) -> None:
        cmd = [sys.executable, "-m", module, *args, "--exit-with-parent"]
        self.procs[name] = subprocess.Popen(cmd, cwd=ROOT)

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
        self.held: deque[Message] = deque()  # per-request messages of a tokens message not yet handed out

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

    def start_workers(self, args, visual: bool, max_batch: int | None = None) -> None:
        """Starts the LLM worker (and the visual worker when `visual`) with the options in `args`; `max_batch`
        requests decoded together (default: the LLM worker's)."""
        common = ["--model", str(args.model), "--results", self.endpoints["results"], "--embeds", self.endpoints["embeds"],
                  "--threads", str(max(1, (os.cpu_count() or 2) // 2))]  # the two workers share this host's cores
        dtype = ["--dtype", args.dtype] if args.dtype else []
        if visual:
            self.workers.start("visual", "visual_worker", *common, *dtype, "--device", args.visual_device,
                               "--requests", self.endpoints["requests"], "--chunk-width", str(args.chunk_width))
        batch = ["--max-batch", str(max_batch)] if max_batch else []
        self.workers.start("llm", "llm_worker", *common, *dtype, *batch, "--device", args.llm_device)

    def receive_batch(self, timeout_s: float | None = None) -> list[Message] | None:
        """The next result message as per-request messages (a decode step's tokens message: one token message per
        request in it), checking the workers every 200 ms; None after timeout_s."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.results.poll(200):
            self.workers.check()
            if deadline is not None and time.monotonic() > deadline:
                return None
        msg = decode(self.results.recv_multipart())
        return per_request(msg) if msg.type == "tokens" else [msg]

    def receive(self, timeout_s: float | None = None) -> Message | None:
        """The next per-request result message; None after timeout_s."""
        while not self.held:
            batch = self.receive_batch(timeout_s)
            if batch is None:
                return None
            self.held.extend(batch)
        return self.held.popleft()

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


def per_request(msg: Message) -> list[Message]:
    """A tokens message → a token message (token_ids, text) for each request in it."""
    out = []
    for entry in msg.fields["requests"]:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and isinstance(entry[1], list)
                and isinstance(entry[2], str)):
            raise ProtocolError(f"tokens message: an entry must be [request id, token ids, text], got {entry!r}")
        out.append(Message("token", entry[0], {"token_ids": entry[1], "text": entry[2]}))
    return out


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


