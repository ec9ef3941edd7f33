"""What every worker process shares: its command line (the shared Options plus device, endpoints and threads), the
heartbeat thread that tells the front end it is alive, its line to the front end's heartbeats (FrontEnd), and dying
with its parent."""

import argparse
import ctypes
import os
import signal
import sys
import threading
import time

import msgspec
import torch
import zmq

from common.config import DTYPES, load_config
from common.messages import FRONTEND_SILENT_S, HEARTBEAT_S, Alive, Heartbeat, WorkerName
from common.options import Options
from common.protocol import ProtocolError, decode, encode
from common.security import Curve


def worker_parser(role: str, description: str, names: tuple[str, ...]) -> argparse.ArgumentParser:
    """The command line of `python -m visual_worker` / `python -m llm_worker`: the named shared options, then the
    worker's own; the caller adds its endpoints."""
    p = argparse.ArgumentParser(description=description)
    Options.add_arguments(p, names)
    p.set_defaults(role=role)
    p.add_argument("--name", default=f"{role}-0", help=f"this worker's name, unique among the front end's workers "
                                                       f"({role}-0, {role}-1, ...: {role}- then letters, digits, _.-)")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--results", required=True, help="front end's results endpoint to connect to")
    p.add_argument("--control", required=True, help="front end's control endpoint (its heartbeats) to connect to")
    p.add_argument("--exit-with-parent", action="store_true", help="die when the launching process dies")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, every core)")
    return p


def start_worker(args: argparse.Namespace) -> Options:
    """Applies the worker-process flags (dying with the parent, threads) and returns the checked shared options."""
    if args.exit_with_parent:
        die_with_parent()
    try:
        if not args.name.startswith(args.role + "-"):
            raise msgspec.ValidationError
        msgspec.convert(args.name, WorkerName)
    except msgspec.ValidationError:
        sys.exit(f"--name must be {args.role}- then 1-64 letters, digits or _.-, got {args.name!r}")
    if args.threads is not None:
        # Two workers on one host each wanting every core make both wait on each other's threads: a CPU op whose
        # threads are not all scheduled stalls for milliseconds, so the launcher gives each worker its share.
        if args.threads < 1:
            sys.exit(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    options = Options.from_args(args)
    try:
        options.check()
    except ValueError as e:
        sys.exit(str(e))
    return options


def resolve_dtype(model_dir, name: str | None) -> torch.dtype:
    return DTYPES[name or load_config(model_dir).dtype]


def die_with_parent() -> None:
    """The kernel sends SIGTERM when the parent exits (Linux); elsewhere the worker loop checks getppid."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:
        sys.exit("parent already gone")


class Heartbeats:
    """A thread with a socket of its own that sends a Heartbeat to the front end every HEARTBEAT_S. The worker loop
    calls `busy()` when it starts a piece of work and `idle()` when done, so a loop stuck inside one shows as a
    growing busy_s while a stopped or dead process shows as silence; a visual worker keeps `subscribers` current."""

    def __init__(self, name: str, results: str, curve: Curve | None):
        self.name, self.started = name.encode(), None
        self.subscribers: list[str] = []
        self.socket = zmq.Context.instance().socket(zmq.PUSH)
        self.socket.setsockopt(zmq.SNDHWM, 4)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.connect_to(self.socket, "frontend")
        self.socket.connect(results)
        threading.Thread(target=self.run, name="heartbeats", daemon=True).start()

    def busy(self) -> None:
        self.started = time.monotonic()

    def idle(self) -> None:
        self.started = None

    def run(self) -> None:
        pid = os.getpid()
        while True:
            started = self.started
            busy = 0.0 if started is None else time.monotonic() - started
            try:
                beat = Heartbeat(pid, busy, list(self.subscribers))
                self.socket.send_multipart([self.name, *encode(beat)], flags=zmq.NOBLOCK)
            except zmq.Again:
                pass  # the front end is not reading: it learns nothing new from a queue of heartbeats
            time.sleep(HEARTBEAT_S)


class FrontEndGone(Exception):
    """The front end has sent no heartbeat for FRONTEND_SILENT_S: the worker drops what it holds for it."""


class FrontEnd:
    """A worker's view of the front end: a SUB on its control socket hearing its Alive messages. Silent for
    FRONTEND_SILENT_S (dead, or stopped), it is `gone`; the worker then drops the requests
    it holds, and tells the front end which once it is heard again. A worker busy in one piece of work reads the
    heartbeats queued meanwhile only after it, so silence is seen within FRONTEND_SILENT_S plus that piece of work."""

    def __init__(self, control: str, curve: Curve | None):
        self.socket = zmq.Context.instance().socket(zmq.SUB)
        self.socket.setsockopt(zmq.MAXMSGSIZE, 4096)
        if curve is not None:
            curve.connect_to(self.socket, "frontend")
        self.socket.connect(control)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.heard_at = time.monotonic()
        self.embeds: list[str] = []  # the visual workers' endpoints, as the front end last named them

    def silent_s(self) -> float:
        while self.socket.poll(0):
            try:
                msg = decode(self.socket.recv_multipart(copy=False))
            except ProtocolError as e:
                print(f"dropped a control message that broke the protocol: {e}", file=sys.stderr)
                continue
            if isinstance(msg, Alive):
                self.heard_at, self.embeds = time.monotonic(), msg.embeds
            else:
                print(f"dropped a {type(msg).__name__} message on the control socket", file=sys.stderr)
        return time.monotonic() - self.heard_at

    def gone(self) -> bool:
        return self.silent_s() > FRONTEND_SILENT_S

    def send(self, socket: zmq.Socket, frames: list) -> None:
        """Sends to the front end, waiting while its queue is full (it is not reading); raises FrontEndGone when it
        falls silent meanwhile, so a worker never blocks for good on a front end that is not coming back."""
        while not socket.poll(HEARTBEAT_S * 1000, zmq.POLLOUT):
            if (silent := self.silent_s()) > FRONTEND_SILENT_S:
                raise FrontEndGone(f"the front end sent no heartbeat for {silent:.1f} s")
        socket.send_multipart(frames, copy=False)
