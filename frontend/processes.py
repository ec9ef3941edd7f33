"""The worker processes the front end starts: their private socket folder, their command lines and thread shares,
and their supervision (an exited process or a silent one is named, stopped and restarted with backoff)."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from common.options import LLM_OPTIONS, VISUAL_OPTIONS, Options

ROOT = Path(__file__).resolve().parents[1]
RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)  # waits before the 1st, 2nd, ... restart in a row
STABLE_S = 60.0  # a worker up this long has its backoff reset


class WorkerDied(RuntimeError):
    """A worker exited or stopped answering; `worker` names it."""

    def __init__(self, worker: str, message: str):
        super().__init__(message)
        self.worker = worker


class Endpoints:
    """The socket addresses of one pipeline (the front end's requests, results and control, and each started visual
    worker's embeds): ipc sockets in a folder only this user can open (removed by `close`), or tcp ports on `host`
    (free ones unless `ports` names the front end's three)."""

    def __init__(self, transport: str, visual_workers: int = 1, host: str = "127.0.0.1", ports: str | None = None):
        self.transport, self.host = transport, host
        self.dir = tempfile.mkdtemp(prefix="qvl-")  # mode 0700
        if ports is not None:
            self.requests, self.results, self.control = (f"tcp://{host}:{p}" for p in ports.split(","))
        else:
            self.requests, self.results, self.control = (self._free(n) for n in ("requests", "results", "control"))
        self.embeds = [self._free(f"embeds-{i}") for i in range(visual_workers)]

    def _free(self, name: str) -> str:
        if self.transport == "ipc":
            return f"ipc://{self.dir}/{name}"
        probe = zmq.Context.instance().socket(zmq.PUSH)
        probe.bind(f"tcp://{self.host}:*")
        endpoint = probe.getsockopt_string(zmq.LAST_ENDPOINT)
        probe.close(linger=0)
        return endpoint

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Worker:
    name: str  # visual-0, llm-1, ...
    command: list[str]
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0  # in a row, without a stable run between them
    next_start_at: float = 0.0
    log: list[str] = field(default_factory=list)  # why it was restarted, newest last

    @property
    def role(self) -> str:
        return self.name.split("-")[0]

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, cwd=ROOT)
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
        if self.process is not None:
            self.process.wait()


class Workers:
    """The worker processes of one pipeline, named visual-0.. and llm-0..; each dies with this process; `check`
    raises WorkerDied naming one that has exited; `restart_due` brings one back after its backoff."""

    def __init__(self, options: Options, endpoints: Endpoints):
        count = options.visual_workers + options.llm_workers
        threads = str(max(1, (os.cpu_count() or 2) // max(1, count)))  # the workers share this host's cores
        tail = ["--results", endpoints.results, "--control", endpoints.control, "--threads", threads,
                "--exit-with-parent"]
        self.workers = {}
        for i, (device, embeds) in enumerate(zip(options.devices("visual"), endpoints.embeds)):
            self.workers[f"visual-{i}"] = Worker(f"visual-{i}", [
                sys.executable, "-m", "visual_worker", *options.argv(VISUAL_OPTIONS), "--name", f"visual-{i}",
                "--device", device, "--requests", endpoints.requests, "--embeds", embeds, *tail])
        for i, device in enumerate(options.devices("llm")):
            self.workers[f"llm-{i}"] = Worker(f"llm-{i}", [
                sys.executable, "-m", "llm_worker", *options.argv(LLM_OPTIONS), "--name", f"llm-{i}", "--device",
                device, *tail])

    def started(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.process is not None]

    def check(self) -> None:
        for w in self.started():
            if not w.next_start_at and w.process.poll() is not None:  # not one already waiting for its restart
                raise WorkerDied(w.name, f"the {w.name} worker died (exit code {w.process.returncode})")

    def stop_for_restart(self, name: str, reason: str) -> float:
        """Kills the worker (if it still runs) and schedules its restart; → seconds until it starts again."""
        w = self.workers[name]
        w.kill()
        now = time.monotonic()
        if now - w.started_at > STABLE_S:
            w.restarts = 0
        wait = RESTART_BACKOFF_S[min(w.restarts, len(RESTART_BACKOFF_S) - 1)]
        w.restarts += 1
        w.next_start_at = now + wait
        w.log = [*w.log[-9:], reason]
        return wait

    def restart_due(self) -> list[str]:
        """Starts the workers whose backoff has passed; → their names."""
        due = [w for w in self.workers.values()
               if w.process is not None and not w.alive() and w.next_start_at and time.monotonic() >= w.next_start_at]
        for w in due:
            w.next_start_at = 0.0
            w.start()
        return [w.name for w in due]

    def stop(self) -> None:
        for w in self.started():
            if w.alive():
                w.process.terminate()
        for w in self.started():
            try:
                w.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                w.kill()
