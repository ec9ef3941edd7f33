"""The pipeline client: binds the requests, results and control sockets, starts and watches the workers (any number
of each kind), routes each request to a visual worker and an LLM worker, sends requests and cancels, and reads
results; a thread of its own sends the workers a heartbeat (Alive) every HEARTBEAT_S. `receive` is the one result
reader: it hands back each request's TokenEntry / Finish / Error events, accepted only from the workers the request
was routed to, and keeps what the workers say about themselves (Ready, Heartbeat) as their health; `answers` runs
many requests through it, `collect` one."""

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import zmq

from common.config import model_identity
from common.messages import (HEARTBEAT_S, Alive, Cancel, Error, Finish, Heartbeat, Ready, Request, Result,
                             TokenEntry, Tokens)
from common.options import Options
from common.protocol import ProtocolError, decode_sent, encode
from common.security import curve
from frontend.processes import Endpoints, WorkerDied, Workers

READY_TIMEOUT_S = 300
SILENT_AFTER_S = 5.0  # a worker whose heartbeats stop this long is taken as stopped (SIGSTOP, a hung host)
STUCK_AFTER_S = 600.0  # a worker inside one piece of work this long is taken as stuck
MAX_RESULT_BYTES = 64 * 2**20  # results are small; a larger message is dropped by ZeroMQ unread


class NoWorker(RuntimeError):
    """No ready visual worker and LLM worker joined to each other can take the request."""


@dataclass
class Health:
    role: str  # visual or llm
    state: str = "starting"  # starting → ready; restarting after a death; refused (another model); gone (a worker
    # that joined by itself and died: not restarted here); down when not started
    started_here: bool = True
    device: str = ""
    capacity: int = 1
    context_len: int = 0
    last_heartbeat: float = 0.0  # time.monotonic() of the newest, 0 before the first
    busy_s: float = 0.0
    pid: int = 0
    subscribers: tuple[str, ...] = ()  # a visual worker's: the LLM workers its embeddings reach
    served: int = 0  # requests it has done its part of since it started
    reason: str = ""  # why it is restarting or refused


@dataclass
class Route:
    """The workers a request went to; the visual worker holds it until its first token."""

    visual: str | None  # None: embeds published by the caller (replay)
    llm: str
    decoding: bool = False


class Pipeline:
    def __init__(self, options: Options):
        self.options = options
        self.model = model_identity(options.model)
        self.endpoints = Endpoints(options.transport, options.visual_workers, options.frontend_host,
                                   options.frontend_ports)
        self.curve = curve(options.curve_keys, "frontend")
        ctx = zmq.Context.instance()
        self.requests = ctx.socket(zmq.ROUTER)  # addressed: each visual worker connects under its name
        self.requests.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a name not connected raises instead of dropping
        self.requests.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker takes its name over from the dead one
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
        self.visual_endpoints = list(self.endpoints.embeds)  # where the LLM workers subscribe; joiners add theirs
        self.closing = threading.Event()
        self.heartbeats = threading.Thread(target=self.send_heartbeats, name="frontend-heartbeats", daemon=True)
        self.heartbeats.start()  # the thread owns the control socket from here on
        self.workers = Workers(options, self.endpoints)
        self.health = {name: Health(w.role, state="down") for name, w in self.workers.workers.items()}
        self.routes: dict[str, Route] = {}
        self.lock = threading.Lock()  # routes and health: the server submits from its event loop, reads in a thread
        self.dropped = 0  # malformed or misdirected result messages dropped
        self.checked_at = 0.0  # time.monotonic() of the last check of the workers
        self.read_at = 0.0  # ... of the last look at the results socket
        self.listening_since = 0.0  # ... since which it has been looked at without a pause: heartbeats that did not
        # come in that time were not sent (those sent while nobody looked wait in the socket and do not count)

    def start(self, roles: tuple[str, ...] = ("visual", "llm")) -> None:
        for name, w in self.workers.workers.items():
            if w.role in roles:
                self.health[name] = Health(w.role)
                w.start()

    def wait_ready(self, roles: tuple[str, ...] = ("visual", "llm"), idle: Callable[[], None] | None = None) -> None:
        """Returns once every started worker of the roles has said Ready and, with both roles, a request can be
        routed (an LLM worker is subscribed to a visual worker; with none started here, once workers have joined);
        `idle` is called between reads (a recorder, a pinger). A worker of another model raises RuntimeError."""
        deadline = time.monotonic() + READY_TIMEOUT_S

        def unready() -> list[str]:
            names = [n for n, h in self.health.items()
                     if h.role in roles and h.started_here and h.state in ("starting", "refused")]
            if {"visual", "llm"} <= set(roles):
                joined = {llm for v in self.ready("visual") for llm in self.health[v].subscribers}
                names += [n for n in self.ready("llm") if n not in joined]
                if not joined.intersection(self.ready("llm")):
                    names.append("a visual worker and an LLM worker joined to each other")
            return names

        while waiting := unready():
            if refused := [f"{n}: {self.health[n].reason}" for n in waiting
                           if n in self.health and self.health[n].state == "refused"]:
                raise RuntimeError("; ".join(refused))
            if idle is not None:
                idle()
            self.receive(timeout_s=0.2)
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers {waiting} not ready after {READY_TIMEOUT_S} s")

    def ready(self, role: str) -> list[str]:
        return [n for n, h in self.health.items() if h.role == role and h.state == "ready"]

    @property
    def context_len(self) -> int:
        """Tokens per request that every ready LLM worker can hold."""
        return min((self.health[n].context_len for n in self.ready("llm")), default=self.options.max_model_len)

    def submit(self, request: Request) -> None:
        """Routes the request (choose_workers) and queues it at its visual worker; one that has just gone away is
        passed over for the next. Raises NoWorker when no pair of ready workers is left."""
        unreachable: set[str] = set()
        while True:
            with self.lock:
                visual, llm = choose_workers(self.health, self.routes.values(), unreachable)
                request.llm = llm
                self.routes[request.id] = Route(visual, llm)
            try:
                self.requests.send_multipart([visual.encode(), *encode(request)], copy=False, flags=zmq.NOBLOCK)
                return
            except zmq.ZMQError as e:  # not connected (it just died: noticed within 200 ms) or its queue is full
                with self.lock:
                    self.routes.pop(request.id, None)
                print(f"front end: {visual} is not taking requests ({e.strerror})", file=sys.stderr)
                unreachable.add(visual)

    def track(self, request_id: str, llm: str) -> None:
        """Routes a request whose embeds the caller publishes itself (replay) to the LLM worker."""
        with self.lock:
            self.routes[request_id] = Route(None, llm, decoding=True)

    def cancel(self, request_id: str) -> None:
        """Sends the cancel along the request's path (behind its embeds); a request already decoding can take any
        visual worker subscribed to its LLM worker."""
        with self.lock:
            route = self.routes.get(request_id)
            if route is None:
                return
            paths = [route.visual] if not route.decoding else \
                [route.visual] + [n for n in self.ready("visual") if route.llm in self.health[n].subscribers]
        for visual in dict.fromkeys(p for p in paths if p is not None):
            try:
                self.requests.send_multipart([visual.encode(), *encode(Cancel(request_id, route.llm))],
                                             flags=zmq.NOBLOCK)
                return
            except zmq.ZMQError:
                continue

    def receive(self, timeout_s: float | None = None) -> list[Result] | None:
        """The next request events (a decode step's TokenEntry for each request in it, or one Finish or Error);
        None after timeout_s. Checks the workers every 200 ms and raises WorkerDied for one that exited, went
        silent or is stuck; a message that breaks the protocol or comes from a worker the request was not routed
        to is logged and dropped."""
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

    def _drop(self, why: str) -> list:
        self.dropped += 1
        print(f"front end: dropped {why}", file=sys.stderr)
        return []

    def _read(self, frames) -> list[Result]:
        try:
            name, msg = decode_sent(frames)
        except ProtocolError as e:
            return self._drop(f"a result message that broke the protocol: {e}")
        role = name.split("-")[0]
        if self.curve is not None and self.curve.sender(frames[0]) != role:
            return self._drop(f"a {type(msg).__name__} message in {name}'s name from {self.curve.sender(frames[0])}")
        with self.lock:
            if isinstance(msg, Tokens):
                mine = [e for e in msg.requests if (r := self.routes.get(e.id)) is not None and r.llm == name]
                for e in mine:
                    route = self.routes[e.id]
                    if not route.decoding and route.visual in self.health:
                        self.health[route.visual].served += 1
                    route.decoding = True
                if len(mine) < len(msg.requests):
                    self._drop(f"{len(msg.requests) - len(mine)} token entries from {name}, which does not hold them")
                return mine
            if isinstance(msg, (Finish, Error)):
                route = self.routes.get(msg.id)
                holders = () if route is None else (route.llm,) if isinstance(msg, Finish) else (route.visual, route.llm)
                if name not in holders:
                    return self._drop(f"a {type(msg).__name__} for {msg.id} from {name}, which does not hold it")
                del self.routes[msg.id]
                self.health[name].served += 1
                return [msg]
            h = self.health.get(name)
            if name in self.workers.workers:
                if h.state not in ("starting", "ready"):  # from a process since stopped: its restart starts afresh
                    return self._drop(f"a {type(msg).__name__} from {name}, which is {h.state}")
            elif h is None or h.state == "gone":  # one that joined by itself, or came back
                h = self.health[name] = Health(role, started_here=False)
            if isinstance(msg, Heartbeat):
                h.last_heartbeat, h.busy_s, h.pid, h.subscribers = time.monotonic(), msg.busy_s, msg.pid, \
                    tuple(msg.subscribers)
            elif isinstance(msg, Ready):
                if msg.model != self.model:
                    h.state, h.reason = "refused", (f"serves model {msg.model}, this front end serves {self.model} "
                                                    f"({self.options.model})")
                    print(f"front end: refused {name}: {h.reason}", file=sys.stderr)
                else:
                    h.state, h.device, h.capacity, h.context_len = "ready", msg.device, max(1, msg.capacity), \
                        msg.context_len
                    if h.role == "visual" and msg.embeds and msg.embeds not in self.visual_endpoints:
                        self.visual_endpoints = [*self.visual_endpoints, msg.embeds]  # the heartbeat names it
            else:
                self._drop(f"a {type(msg).__name__} message on the results socket from {name}")
        return []

    def send_heartbeats(self) -> None:
        """A front end whose process stops or dies falls silent: the workers drop its requests after
        FRONTEND_SILENT_S (common/runtime.py FrontEnd). The heartbeat names the visual workers' endpoints, which
        the LLM workers subscribe to."""
        while not self.closing.wait(HEARTBEAT_S):
            self.control.send_multipart(encode(Alive(os.getpid(), self.visual_endpoints)))  # PUB: never blocks

    def check(self) -> None:
        """Raises WorkerDied for a worker that has exited, whose heartbeats stopped, or that is stuck."""
        self.workers.check()
        now = time.monotonic()
        for name, h in list(self.health.items()):
            if h.state in ("down", "restarting", "gone", "refused") or not h.last_heartbeat:
                continue
            if now - max(h.last_heartbeat, self.listening_since) > SILENT_AFTER_S:
                raise WorkerDied(name, f"the {name} worker stopped answering (no heartbeat for "
                                       f"{now - h.last_heartbeat:.1f} s)")
            if h.busy_s > STUCK_AFTER_S:
                raise WorkerDied(name, f"the {name} worker is stuck ({h.busy_s:.0f} s in one piece of work)")

    def restart(self, died: WorkerDied) -> float | None:
        """Stops the named worker and schedules its restart with backoff; → seconds until it starts, None for a
        worker that joined by itself (it is forgotten until it says Ready again)."""
        with self.lock:
            if not self.health[died.worker].started_here:
                self.health[died.worker] = Health(died.worker.split("-")[0], "gone", False, reason=str(died))
                return None
            self.health[died.worker] = Health(died.worker.split("-")[0], "restarting", reason=str(died))
        return self.workers.stop_for_restart(died.worker, str(died))

    def lost(self, worker: str) -> list[str]:
        """Forgets and → the requests a dead worker held: every one routed to an LLM worker, a visual worker's until
        their first token."""
        with self.lock:
            ids = [rid for rid, r in self.routes.items() if r.llm == worker or (r.visual == worker and not r.decoding)]
            for rid in ids:
                del self.routes[rid]
        return ids

    def restart_due(self) -> None:
        for name in self.workers.restart_due():
            with self.lock:
                self.health[name] = Health(self.workers.workers[name].role)

    def close(self) -> None:
        self.workers.stop()
        self.closing.set()
        self.heartbeats.join()
        for socket in (self.requests, self.results, self.control):
            socket.close(linger=0)
        self.endpoints.close()


def choose_workers(health: dict[str, Health], routes: Iterable[Route], unreachable: set[str] = frozenset()
                   ) -> tuple[str, str]:
    """→ (visual, llm) for a new request: the ready LLM worker holding the fewest requests per batch row, then among
    the ready visual workers subscribed to it the one holding the fewest requests not yet decoding (least
    outstanding work, not round-robin); ties go to the one that has served fewest, then to the first name. Raises
    NoWorker when no such pair is ready."""
    held = dict.fromkeys(health, 0)
    for route in routes:
        held[route.llm] = held.get(route.llm, 0) + 1
        if route.visual is not None and not route.decoding:
            held[route.visual] = held.get(route.visual, 0) + 1
    ready = {role: [n for n, h in health.items() if h.role == role and h.state == "ready" and n not in unreachable]
             for role in ("visual", "llm")}
    for llm in sorted(ready["llm"], key=lambda n: (held[n] / health[n].capacity, health[n].served, n)):
        if visual := [n for n in ready["visual"] if llm in health[n].subscribers]:
            return min(visual, key=lambda n: (held[n], health[n].served, n)), llm
    states = ", ".join(f"{n} {h.state}" for n, h in health.items()) or "none"
    raise NoWorker(f"no ready visual worker and LLM worker joined to each other can take the request ({states})")


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
