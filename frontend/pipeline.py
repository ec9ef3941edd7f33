"""The pipeline client: binds the requests, results and control sockets, starts and watches the workers, sends
requests and cancels, and reads results; a thread of its own sends the workers a heartbeat (Alive) every
HEARTBEAT_S. `receive` is the one result reader: it hands back each request's TokenEntry / Finish /
Error events and keeps what the workers say about themselves (Ready, Heartbeat) as their health; `answers` runs
many requests through it, `collect` one."""

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import zmq

from common.messages import HEARTBEAT_S, Alive, Cancel, Error, Finish, Heartbeat, Ready, Request, Result, TokenEntry, Tokens
from common.options import Options
from common.protocol import ProtocolError, decode, encode
from common.security import curve
from frontend.processes import Endpoints, WorkerDied, Workers

READY_TIMEOUT_S = 300
SILENT_AFTER_S = 5.0  # a worker whose heartbeats stop this long is taken as stopped (SIGSTOP, a hung host)
STUCK_AFTER_S = 600.0  # a worker inside one piece of work this long is taken as stuck
MAX_RESULT_BYTES = 64 * 2**20  # results are small; a larger message is dropped by ZeroMQ unread


@dataclass
class Health:
    state: str = "starting"  # starting → ready; restarting after a death; down when not started here
    last_heartbeat: float = 0.0  # time.monotonic() of the newest, 0 before the first
    busy_s: float = 0.0
    pid: int = 0
    context_len: int = 0
    reason: str = ""  # why it is restarting


class Pipeline:
    def __init__(self, options: Options):
        self.options = options
        self.endpoints = Endpoints(options.transport)
        self.curve = curve(options.curve_keys, "frontend")
        ctx = zmq.Context.instance()
        self.requests = ctx.socket(zmq.PUSH)
        self.requests.setsockopt(zmq.SNDHWM, 1000)
        self.results = ctx.socket(zmq.PULL)
        self.results.setsockopt(zmq.MAXMSGSIZE, MAX_RESULT_BYTES)
        self.control = ctx.socket(zmq.PUB)  # the front end's heartbeats to every worker
        if self.curve is not None:
            for socket in (self.requests, self.results, self.control):
                self.curve.serve(socket)
        self.requests.bind(self.endpoints.requests)
        self.results.bind(self.endpoints.results)
        self.control.bind(self.endpoints.control)
        self.closing = threading.Event()
        self.heartbeats = threading.Thread(target=self.send_heartbeats, name="frontend-heartbeats", daemon=True)
        self.heartbeats.start()  # the thread owns the control socket from here on
        self.workers = Workers(options, self.endpoints)
        self.health = {name: Health(state="down") for name in self.workers.workers}
        self.dropped = 0  # malformed result messages dropped
        self.checked_at = 0.0  # time.monotonic() of the last check of the workers
        self.read_at = 0.0  # ... of the last look at the results socket
        self.listening_since = 0.0  # ... since which it has been looked at without a pause: heartbeats that did not
        # come in that time were not sent (those sent while nobody looked wait in the socket and do not count)

    def start(self, names: tuple[str, ...] = ("visual", "llm")) -> None:
        for name in names:
            self.health[name] = Health()
        self.workers.start(names)

    def wait_ready(self, names: tuple[str, ...] = ("visual", "llm"), idle: Callable[[], None] | None = None) -> None:
        """Returns once every named worker has said Ready; `idle` is called between reads (a recorder, a pinger)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while any(self.health[n].state != "ready" for n in names):
            if idle is not None:
                idle()
            self.receive(timeout_s=0.2)
            if time.monotonic() > deadline:
                waiting = [n for n in names if self.health[n].state != "ready"]
                raise TimeoutError(f"workers {waiting} not ready after {READY_TIMEOUT_S} s")

    @property
    def context_len(self) -> int:
        return self.health["llm"].context_len or self.options.max_model_len

    def submit(self, request: Request) -> None:
        """Queues a request for the visual worker; raises zmq.Again when none is taking requests."""
        self.requests.send_multipart(encode(request), copy=False, flags=zmq.NOBLOCK)

    def cancel(self, request_id: str) -> None:
        self.requests.send_multipart(encode(Cancel(request_id)), flags=zmq.NOBLOCK)

    def receive(self, timeout_s: float | None = None) -> list[Result] | None:
        """The next request events (a decode step's TokenEntry for each request in it, or one Finish or Error);
        None after timeout_s. Checks the workers every 200 ms and raises WorkerDied for one that exited, went
        silent or is stuck; a message that breaks the protocol is logged and dropped."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            now = time.monotonic()
            if now - self.read_at > 1.0:
                self.listening_since = now
            self.read_at = now
            if time.monotonic() - self.checked_at >= 0.2:  # also while results flow: a busy pipeline gets checked
                self.checked_at = time.monotonic()
                self.check()
            if self.results.poll(200):
                events = self._read(self.results.recv_multipart(copy=False))
                if events:
                    return events
            if deadline is not None and time.monotonic() > deadline:
                return None

    def _read(self, frames) -> list[Result]:
        try:
            msg = decode(frames)
        except ProtocolError as e:
            self.dropped += 1
            print(f"front end: dropped a result message that broke the protocol: {e}", file=sys.stderr)
            return []
        if self.curve is not None and not sent_by_its_owner(msg, self.curve.sender(frames[0])):
            self.dropped += 1
            print(f"front end: dropped a {type(msg).__name__} message from {self.curve.sender(frames[0])}, which does "
                  "not send those", file=sys.stderr)
            return []
        if isinstance(msg, Tokens):
            return msg.requests
        if isinstance(msg, (Finish, Error)):
            return [msg]
        if isinstance(msg, Heartbeat):
            h = self.health[msg.worker]
            h.last_heartbeat, h.busy_s, h.pid = time.monotonic(), msg.busy_s, msg.pid
        elif isinstance(msg, Ready):
            h = self.health[msg.worker]
            h.state, h.context_len = "ready", msg.context_len
        else:
            self.dropped += 1
            print(f"front end: dropped a {type(msg).__name__} message on the results socket", file=sys.stderr)
        return []

    def send_heartbeats(self) -> None:
        """A front end whose process stops or dies falls silent: the workers drop its requests after
        FRONTEND_SILENT_S (common/runtime.py FrontEnd)."""
        alive = encode(Alive(os.getpid()))
        while not self.closing.wait(HEARTBEAT_S):
            self.control.send_multipart(alive)  # PUB: never blocks

    def check(self) -> None:
        """Raises WorkerDied for a started worker that has exited, whose heartbeats stopped, or that is stuck."""
        self.workers.check()
        now = time.monotonic()
        for name, h in self.health.items():
            if h.state in ("down", "restarting") or not h.last_heartbeat:
                continue
            if now - max(h.last_heartbeat, self.listening_since) > SILENT_AFTER_S:
                raise WorkerDied(name, f"the {name} worker stopped answering (no heartbeat for "
                                       f"{now - h.last_heartbeat:.1f} s)")
            if h.busy_s > STUCK_AFTER_S:
                raise WorkerDied(name, f"the {name} worker is stuck ({h.busy_s:.0f} s in one piece of work)")

    def restart(self, died: WorkerDied) -> float:
        """Stops the named worker and schedules its restart with backoff; → seconds until it starts."""
        self.health[died.worker] = Health(state="restarting", reason=str(died))
        return self.workers.stop_for_restart(died.worker, str(died))

    def restart_due(self) -> None:
        for name in self.workers.restart_due():
            self.health[name] = Health()

    def close(self) -> None:
        self.workers.stop()
        self.closing.set()
        self.heartbeats.join()
        for socket in (self.requests, self.results, self.control):
            socket.close(linger=0)
        self.endpoints.close()


def sent_by_its_owner(msg, sender: str | None) -> bool:
    """Whether the role that sent a result message is the one that sends its kind: tokens and finishes come from the
    LLM worker, errors from either worker, a heartbeat or ready from the worker it names."""
    if isinstance(msg, (Tokens, Finish)):
        return sender == "llm"
    if isinstance(msg, Error):
        return sender in ("visual", "llm")
    return isinstance(msg, (Heartbeat, Ready)) and sender == msg.worker


def answers(pipeline: Pipeline, requests: Iterable[Request], in_flight: int = 1,
            on_text: Callable[[str, str], None] | None = None,
            send: Callable[[Request], None] | None = None) -> Iterator[tuple[Request, dict]]:
    """Runs requests through the pipeline with up to `in_flight` queued at once (so the LLM worker batches them while
    the visual worker embeds the next) and yields (request, result) as each ends. A result has text, token_ids,
    finish_reason, prompt_tokens, completion_tokens and timings, or error (the message) and code. `on_text(id, text)`
    sees the text as it streams; `send` replaces pipeline.submit (replay publishes recorded messages itself)."""
    send = send or pipeline.submit
    queue = iter(requests)
    waiting: dict[str, tuple[Request, list[str], list[int]]] = {}
    exhausted = False
    while waiting or not exhausted:
        while not exhausted and len(waiting) < in_flight:
            request = next(queue, None)
            if request is None:
                exhausted = True
                break
            send(request)
            waiting[request.id] = (request, [], [])
        for event in pipeline.receive() if waiting else ():
            if event.id not in waiting:
                continue
            request, text, token_ids = waiting[event.id]
            if isinstance(event, TokenEntry):
                text.append(event.text)
                token_ids += event.token_ids
                if on_text is not None:
                    on_text(event.id, event.text)
                continue
            del waiting[event.id]
            if isinstance(event, Error):
                yield request, {"error": event.message, "code": event.code, "text": "".join(text)}
            else:
                yield request, {"text": "".join(text), "token_ids": token_ids, "finish_reason": event.finish_reason,
                                "prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                                "timings": event.timings}


def collect(pipeline: Pipeline, request: Request, on_text: Callable[[str], None] | None = None,
            send: Callable[[Request], None] | None = None) -> dict:
    """One request's result; an error from the pipeline raises RuntimeError with its message."""
    stream = None if on_text is None else (lambda _, text: on_text(text))
    _, result = next(answers(pipeline, [request], on_text=stream, send=send))
    if "error" in result:
        raise RuntimeError(result["error"])
    return result
