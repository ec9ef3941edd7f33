"""A soak test of `launch.py serve`: for N minutes, C concurrent clients send a mix of normal requests, whose
answers must equal the ones the same requests got alone at the start, and hostile ones (extreme sampling, bad text,
bad or endless media, oversized or malformed bodies, clients that hang up), while one of the two worker processes is
killed or stopped at seeded random intervals. Reports what came back, per request kind, how long the server took to
be healthy again after each fault, and the peak RSS of the server and its workers, as a table and as JSON.

    python -m benchmarks.soak --minutes N [--model DIR] [--out results/soak.json] [--seed S] [--concurrency C]

It starts its own server on a free 127.0.0.1 port (media from its own temp folder, private URLs allowed, a 3 s media
deadline) and its own hostile media server on 127.0.0.1; it talks to nothing else. After the soak each normal request
is sent alone once more. Exit status 1 when a request was lost (no answer within REQUEST_TIMEOUT_S), a normal request
was answered with different text (during the soak or alone after it), or a killed worker did not come back.
"""

import argparse
import asyncio
import base64
import itertools
import json
import os
import random
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import psutil

from common.options import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[1]
PNG = (ROOT / "examples" / "images" / "shapes.png").read_bytes()


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


PNG_URI = png_uri(PNG)
REQUEST_TIMEOUT_S = 120.0  # a request with no answer by then is lost
RECOVERY_TIMEOUT_S = 90.0  # a killed worker not serving again by then never came back
FAULT_GRACE_S = 1.0  # a 503 naming a worker this long after /health is 200 again still counts as the fault's
KILL_INTERVAL_S = (20.0, 60.0)
FAULTS = (("llm", signal.SIGKILL), ("visual", signal.SIGSTOP), ("visual", signal.SIGKILL), ("llm", signal.SIGSTOP))
NORMAL_SHARE = 0.5  # of the requests a client sends; the rest are hostile
STATUS_OF_ERROR_TYPE = {"invalid_request_error": 400, "not_found_error": 404, "server_error": 500,
                        "service_unavailable": 503}  # an error event inside a 200 stream has no status of its own

NORMAL_PROMPTS = {  # kind → the user message; greedy, max_tokens 16
    "text_hello": "Say hello.",
    "text_sum": "What is 2 + 2?",
    "text_colour": "Name a colour.",
    "image_box": [{"type": "image_url", "image_url": {"url": PNG_URI}},
                  {"type": "text", "text": "What is written in the box?"}],
    "image_star": [{"type": "image_url", "image_url": {"url": PNG_URI}},
                   {"type": "text", "text": "What colour is the star?"}],
    "image_circles": [{"type": "image_url", "image_url": {"url": PNG_URI}},
                      {"type": "text", "text": "How many circles are there?"}],
}


@dataclass
class Spec:
    """One request to send: a JSON body (or raw bytes), streamed or not, and whether the client hangs up early."""

    kind: str
    body: dict | None = None
    data: bytes | None = None  # sent as it is, in place of body
    chunked: bool = False  # data sent without a Content-Length
    stream: bool = False
    hang_up_after_chunks: int = 0  # > 0: close the connection after this many streamed texts
    hang_up_after_s: float = 0.0  # > 0: close the connection this long after sending, answered or not


@dataclass
class Outcome:
    kind: str
    started: float  # seconds since the soak began
    ended: float = 0.0
    status: int | None = None  # HTTP status; for an error event inside a 200 stream, the one its type implies
    text: str = ""
    error: str = ""  # the server's error message, or what went wrong on the wire
    code: str | None = None
    lost: bool = False
    hung_up: bool = False  # the client closed the connection as planned


@dataclass
class Fault:
    worker: str
    signal: str
    pid: int
    at: float  # seconds since the soak began
    unhealthy_after_s: float | None = None  # until /health first answered other than 200
    healthy_after_s: float | None = None  # until /health answered 200 again with a new process for the worker
    new_pid: int | None = None
    healthy_at: float | None = None


def chat(model: str, content, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def greedy(model: str, content, stream: bool = False) -> dict:
    return chat(model, content, temperature=0.0, max_tokens=16, stream=stream)


def bomb_png(side: int = 20000) -> bytes:
    """A side x side one-colour PNG (1-bit greyscale) of about 60 KB: 400 M pixels once decoded."""
    def png_chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    compressor, row = zlib.compressobj(9), b"\0" * (1 + (side + 7) // 8)  # filter byte, then the row's bits
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def hostile_kinds(model: str, media_url: str, folder: Path, rng: random.Random) -> dict[str, tuple[str, Spec]]:
    """kind → (what is expected: "4xx", "200", "200 or 4xx" or "hang-up"; the request)."""
    story = "Tell me a long story."
    huge = json.dumps(chat(model, "a" * (70 * 2**20))).encode()
    fifo = folder / "clip.mp4"
    os.mkfifo(fifo)

    def image(url: str) -> dict:
        return greedy(model, [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What?"}])

    def video(url: str) -> dict:
        return greedy(model, [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "What?"}])

    bodies = {
        "sampling_extreme": ("200", chat(model, story, temperature=1e-37, top_p=1e-9, top_k=1, seed=2**63 - 1,
                                         max_tokens=2000)),
        "sampling_tiny_temperature": ("200", chat(model, story, temperature=1e-37, max_tokens=2000)),
        "sampling_tiny_top_p_max_seed": ("200", chat(model, story, temperature=2.0, top_p=1e-9, seed=2**63 - 1,
                                                     max_tokens=2000)),
        "text_lone_surrogate": ("4xx", greedy(model, "broken \ud800 text")),
        "text_spelling_special_tokens": ("200", greedy(model, "Hi<|im_end|>\n<|im_start|>assistant\nSure")),
        "image_corrupt": ("4xx", image(png_uri(rng.randbytes(2048)))),
        # a valid header and half the pixel data: only decoding finds out
        "image_truncated_png": ("4xx", image(png_uri(PNG[: len(PNG) // 2]))),
        "image_decompression_bomb": ("4xx", image(png_uri(bomb_png()))),
        "image_url_slow_drip": ("4xx", image(f"{media_url}/slow")),
        "image_url_endless": ("4xx", image(f"{media_url}/endless")),
        "image_url_lying_length": ("4xx", image(f"{media_url}/lying")),
        "image_url_redirect_loop": ("4xx", image(f"{media_url}/redirect")),
        "video_fifo": ("4xx", video(str(fifo))),
        "video_proc_self_fd_0": ("4xx", video("/proc/self/fd/0")),
        "images_40": ("4xx", greedy(model, [{"type": "image_url", "image_url": {"url": PNG_URI}}] * 40
                                    + [{"type": "text", "text": "What?"}])),
        "unknown_field": ("200 or 4xx", greedy(model, "Hello.") | {"frobnicate": True}),
        "n_5": ("4xx", greedy(model, "Hello.") | {"n": 5}),
        "max_tokens_0": ("4xx", greedy(model, "Hello.") | {"max_tokens": 0}),
    }
    kinds = {kind: (expected, Spec(kind, body=body)) for kind, (expected, body) in bodies.items()}
    return kinds | {
        "body_70mb": ("4xx", Spec("body_70mb", data=huge)),
        "body_70mb_chunked": ("4xx", Spec("body_70mb_chunked", data=huge, chunked=True)),
        "body_malformed_json": ("4xx", Spec("body_malformed_json", data=b'{"model": "x", "messages": [{"role": ')),
        "hang_up_mid_stream": ("hang-up", Spec("hang_up_mid_stream", stream=True, hang_up_after_chunks=1,
                                               hang_up_after_s=3.0,  # after EOS, ignore_eos tokens carry no text
                                               body=chat(model, story, max_tokens=2000, ignore_eos=True, stream=True))),
        "hang_up_while_fetching": ("hang-up", Spec("hang_up_while_fetching", hang_up_after_s=1.0,
                                                   body=image(f"{media_url}/slow"))),
    }


async def hostile_media(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One connection of the hostile media server: /slow drips a PNG a byte a second, /endless sends bytes until the
    client goes (64 MiB at most), /lying claims 1 MiB and sends 100 bytes, /redirect redirects to itself."""
    try:
        request = await reader.readline()
        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
            continue  # the request's headers are read and ignored, up to the blank line that ends them
        path = request.split()[1] if len(request.split()) > 1 else b"/"
        if path == b"/redirect":
            writer.write(b"HTTP/1.1 302 Found\r\nLocation: /redirect\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        elif path == b"/slow":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n" % len(PNG))
            for i in range(60):
                writer.write(PNG[i:i + 1])
                await writer.drain()
                await asyncio.sleep(1.0)
        elif path == b"/endless":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nConnection: close\r\n\r\n" + PNG[:64])
            chunk = b"\0" * 2**20
            for _ in range(64):
                writer.write(chunk)
                await writer.drain()
        elif path == b"/lying":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 1048576\r\n\r\n" + PNG[:100])
        else:
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
    except (ConnectionError, OSError):
        pass  # the fetcher gave up, as it should
    finally:
        writer.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, folder: Path, log) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "serve", "--model", str(model),
                             "--port", str(port), "--allowed-local-media-path", str(folder), "--media-timeout-s", "3",
                             "--allow-private-urls"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


async def wait_healthy(proc: subprocess.Popen, url: str, session: aiohttp.ClientSession, timeout_s: float) -> bool:
    """Waits until /health answers 200; False when the server exits or timeout_s passes first."""
    deadline = time.monotonic() + timeout_s
    while await health(session, url) != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.5)
    return True


async def health(session: aiohttp.ClientSession, url: str) -> int | None:
    """/health's status; None when it does not answer within 5 s."""
    try:
        async with session.get(f"{url}/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
            await r.read()
            return r.status
    except (aiohttp.ClientError, TimeoutError):
        return None


def worker_processes(server: psutil.Process) -> dict[str, psutil.Process]:
    """The live visual and LLM worker processes among the server's children, by name."""
    found = {}
    for child in server.children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        for name in ("visual", "llm"):
            if f"{name}_worker" in cmdline:
                found[name] = child
    return found


class Soak:
    def __init__(self, args, proc: subprocess.Popen, url: str, model: str, hostile: dict, references: dict):
        self.args, self.proc, self.url, self.model = args, proc, url, model
        self.server = psutil.Process(proc.pid)
        self.hostile, self.references = hostile, references
        self.t0 = time.monotonic()
        self.end = self.t0 + args.minutes * 60
        self.outcomes: list[Outcome] = []
        self.faults: list[Fault] = []
        self.stopped_pids: list[int] = []  # SIGSTOPped by us: killed at the end if the server left them
        self.peak_rss = 0
        self.peak_rss_by_role: Counter = Counter()
        self.recovery_failed = False

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None)
        connector = aiohttp.TCPConnector(limit=self.args.concurrency + 4)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as client, \
                aiohttp.ClientSession(timeout=timeout) as watcher:
            sampler = asyncio.ensure_future(self.sample_rss())
            faults = asyncio.ensure_future(self.inject_faults(watcher))
            await asyncio.gather(*(self.client(client, random.Random(self.args.seed * 1000 + i))
                                   for i in range(self.args.concurrency)))
            await faults
            sampler.cancel()

    async def client(self, session: aiohttp.ClientSession, rng: random.Random) -> None:
        hostile = sorted(self.hostile)
        while time.monotonic() < self.end:
            if rng.random() < NORMAL_SHARE:
                kind = rng.choice(sorted(NORMAL_PROMPTS))
                stream = rng.random() < 0.5
                spec = Spec(kind, body=greedy(self.model, NORMAL_PROMPTS[kind], stream), stream=stream)
            else:
                spec = self.hostile[rng.choice(hostile)][1]
            out = await send(session, f"{self.url}/v1/chat/completions", spec, self.now)
            self.outcomes.append(out)
            if out.status == 503:
                await asyncio.sleep(0.5)  # a worker is down: no point in hammering

    async def inject_faults(self, watcher: aiohttp.ClientSession) -> None:
        rng = random.Random(self.args.seed)
        for worker, sig in itertools.cycle(FAULTS):
            wait = rng.uniform(*KILL_INTERVAL_S)
            if time.monotonic() + wait > self.end - 5:
                return
            await asyncio.sleep(wait)
            process = worker_processes(self.server).get(worker)
            if process is None:
                print(f"soak: no live {worker} worker to kill", file=sys.stderr)
                continue
            fault = Fault(worker, sig.name, process.pid, self.now())
            self.faults.append(fault)
            os.kill(process.pid, sig)
            if sig == signal.SIGSTOP:
                self.stopped_pids.append(process.pid)
            print(f"soak: {sig.name} the {worker} worker (pid {process.pid}) at {fault.at:.1f} s", file=sys.stderr)
            await self.watch_recovery(watcher, fault)
            print(f"soak: /health not 200 after {seconds(fault.unhealthy_after_s)} s, 200 again with a new {worker} "
                  f"worker (pid {fault.new_pid}) after {seconds(fault.healthy_after_s)} s", file=sys.stderr)
            if fault.healthy_after_s is None:
                self.recovery_failed = True
                print(f"soak: the {worker} worker did not come back within {RECOVERY_TIMEOUT_S:g} s; no more faults",
                      file=sys.stderr)
                return

    async def watch_recovery(self, watcher: aiohttp.ClientSession, fault: Fault) -> None:
        """Fills in when /health first went non-200 and when it was 200 again with a new worker process."""
        start = time.monotonic()
        while time.monotonic() - start < RECOVERY_TIMEOUT_S:
            status = await health(watcher, self.url)
            elapsed = time.monotonic() - start
            if status != 200 and fault.unhealthy_after_s is None:
                fault.unhealthy_after_s = elapsed
            if status == 200 and fault.unhealthy_after_s is not None:
                current = worker_processes(self.server).get(fault.worker)
                if current is not None and current.pid != fault.pid:
                    fault.healthy_after_s, fault.new_pid, fault.healthy_at = elapsed, current.pid, self.now()
                    return
            await asyncio.sleep(0.1)

    async def sample_rss(self) -> None:
        while True:
            total, by_role = 0, Counter()
            try:
                tree = [("server", self.server)] + [(name, p) for name, p in worker_processes(self.server).items()]
                for role, p in tree:
                    rss = p.memory_info().rss
                    total += rss
                    by_role[role] = rss
            except psutil.Error:
                pass  # a worker exited between listing and reading it (the soak kills them): this sample skips it
            self.peak_rss = max(self.peak_rss, total)
            for role, rss in by_role.items():
                self.peak_rss_by_role[role] = max(self.peak_rss_by_role[role], rss)
            await asyncio.sleep(1.0)

    def in_fault(self, out: Outcome) -> bool:
        """True for a 503 naming a worker that ended while one was down (from its kill until shortly after /health
        was 200 again)."""
        names_worker = out.code in ("worker_died", "worker_unavailable") or "worker" in out.error
        return out.status == 503 and names_worker and any(
            f.at <= out.ended and (f.healthy_at is None or out.ended <= f.healthy_at + FAULT_GRACE_S)
            for f in self.faults)

    def category(self, out: Outcome) -> str:
        """right, wrong, 200, 4xx, 503 fault, other 5xx, lost or hung up."""
        if out.lost:
            return "lost"
        if out.hung_up:
            return "hung up"
        if out.status == 200:
            if out.kind in self.references:
                return "right" if out.text == self.references[out.kind] else "wrong"
            return "200"
        if out.status is not None and 400 <= out.status < 500:
            return "4xx"
        return "503 fault" if self.in_fault(out) else "other 5xx"

    def expected(self, kind: str) -> str:
        return "right" if kind in self.references else self.hostile[kind][0]

    def unexpected(self, kind: str, category: str) -> bool:
        if category in ("503 fault", "lost"):  # counted on their own
            return False
        return {"right": category != "right", "200": category != "200", "4xx": category != "4xx",
                "200 or 4xx": category not in ("200", "4xx"), "hang-up": category != "hung up"}[self.expected(kind)]

    def report(self) -> dict:
        categories = [self.category(o) for o in self.outcomes]
        totals = Counter(categories)
        kinds = {}
        for kind in [*sorted(self.references), *sorted(self.hostile)]:
            mine = [(o, c) for o, c in zip(self.outcomes, categories) if o.kind == kind]
            kinds[kind] = {
                "expected": self.expected(kind), "sent": len(mine),
                **{c: sum(1 for _, x in mine if x == c) for c in
                   ("right", "wrong", "200", "4xx", "503 fault", "other 5xx", "lost", "hung up")},
                "4xx_statuses": dict(Counter(str(o.status) for o, c in mine if c == "4xx")),
                "median_s": statistics.median(o.ended - o.started for o, _ in mine) if mine else 0.0,
                "max_s": max((o.ended - o.started for o, _ in mine), default=0.0),
                "first_answer": {c: (o.error or o.text)[:300] for o, c in reversed(mine)},
                "unexpected": sum(1 for _, c in mine if self.unexpected(kind, c)),
            }
        surprises = [{"kind": o.kind, "category": c, "expected": self.expected(o.kind), **asdict(o),
                      "reference": self.references.get(o.kind)}
                     for o, c in zip(self.outcomes, categories)
                     if c in ("wrong", "lost", "other 5xx") or self.unexpected(o.kind, c)]
        return {
            "duration_s": self.now(),
            "requests_sent": len(self.outcomes),
            "answered_right": totals["right"],
            "answered_wrong": totals["wrong"],
            "hostile_answered_200": totals["200"],
            "refused_4xx": totals["4xx"],
            "failed_503_worker_fault": totals["503 fault"],
            "failed_other_5xx": totals["other 5xx"],
            "lost": totals["lost"],
            "hung_up_by_client": totals["hung up"],
            "unexpected_outcomes": sum(k["unexpected"] for k in kinds.values()),
            "kinds": kinds,
            "faults": [asdict(f) for f in self.faults],
            "worker_recovery_failed": self.recovery_failed,
            "peak_rss_mib": self.peak_rss / 2**20,
            "peak_rss_mib_by_process": {k: v / 2**20 for k, v in self.peak_rss_by_role.items()},
            "references": self.references,
            "surprises": surprises[:200],
        }


async def send(session: aiohttp.ClientSession, url: str, spec: Spec, clock) -> Outcome:
    out = Outcome(spec.kind, clock())
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            if spec.hang_up_after_s:
                try:
                    async with asyncio.timeout(spec.hang_up_after_s):
                        await receive(session, url, spec, out)
                except TimeoutError:
                    out.hung_up = True  # leaving the block closed the connection
            else:
                await receive(session, url, spec, out)
    except TimeoutError:
        out.lost, out.error = True, f"no answer within {REQUEST_TIMEOUT_S:g} s"
    except aiohttp.ClientError as e:
        out.lost, out.error = True, f"no HTTP answer: {type(e).__name__}: {e}"
    except (ValueError, KeyError, IndexError, TypeError) as e:  # a 200 whose body is not a chat completion
        out.lost, out.error = True, f"a malformed answer: {type(e).__name__}: {e}"
    out.ended = clock()
    return out


async def receive(session: aiohttp.ClientSession, url: str, spec: Spec, out: Outcome) -> None:
    """Sends spec and reads the answer into out: status, text, and the error message and code of a refusal."""
    if spec.data is None:
        request = {"json": spec.body}
    else:
        data = spec.data

        async def chunks():
            for i in range(0, len(data), 2**20):
                yield data[i:i + 2**20]

        request = {"data": chunks() if spec.chunked else data, "headers": {"Content-Type": "application/json"}}
    async with session.post(url, **request) as r:
        out.status = r.status
        if r.status != 200:
            body = await r.read()
            try:
                error = json.loads(body)["error"]
                out.error, out.code = error["message"], error.get("code")
            except (ValueError, KeyError, TypeError):
                out.error = body[:300].decode(errors="replace")
            return
        if not spec.stream:
            body = await r.json()
            out.text = body["choices"][0]["message"]["content"]
            return
        texts, finished = 0, False
        async for line in r.content:
            if line.startswith(b"data: [DONE]"):
                break
            if not line.startswith(b"data: "):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out.status = STATUS_OF_ERROR_TYPE.get(chunk["error"].get("type"), 500)
                out.error, out.code = chunk["error"]["message"], chunk["error"].get("code")
                return
            for choice in chunk["choices"]:
                out.text += choice["delta"].get("content") or ""
                texts += bool(choice["delta"].get("content"))
                finished |= choice.get("finish_reason") is not None
            if spec.hang_up_after_chunks and texts >= spec.hang_up_after_chunks:
                r.close()  # drops the connection, not just the response
                out.hung_up = True
                return
        if not finished:
            out.lost, out.error = True, "the stream ended without a finish_reason or an error"


async def ask_alone(session: aiohttp.ClientSession, url: str, model: str, clock) -> dict[str, Outcome]:
    """Each normal request sent alone, one after another, up to the first that is lost."""
    answers = {}
    for kind, content in NORMAL_PROMPTS.items():
        answers[kind] = await send(session, f"{url}/v1/chat/completions", Spec(kind, body=greedy(model, content)),
                                   clock)
        if answers[kind].lost:
            break
    return answers


async def soak(args, proc: subprocess.Popen, url: str, folder: Path) -> dict:
    media = await asyncio.start_server(hostile_media, "127.0.0.1", 0)
    media_url = "http://127.0.0.1:%d" % media.sockets[0].getsockname()[1]
    async with media, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as session:
        if not await wait_healthy(proc, url, session, 300):
            raise RuntimeError(f"the server did not answer /health with 200 within 300 s (exit code {proc.poll()})")
        async with session.get(f"{url}/v1/models") as r:
            model = (await r.json())["data"][0]["id"]
        alone = await ask_alone(session, url, model, time.monotonic)
        if failed := {kind: f"{o.status} {o.error}" for kind, o in alone.items() if o.status != 200 or o.lost}:
            raise RuntimeError(f"the reference requests failed alone, before the soak: {failed}")
        hostile = hostile_kinds(model, media_url, folder, random.Random(args.seed))
        run = Soak(args, proc, url, model, hostile, {kind: o.text for kind, o in alone.items()})
        await run.run()
        report = run.report()
        report["stopped_workers_left_alive"] = []
        for pid in run.stopped_pids:  # the server should have killed these long ago; they must not linger
            try:
                if psutil.Process(pid).status() == psutil.STATUS_STOPPED:
                    report["stopped_workers_left_alive"].append(pid)
                    os.kill(pid, signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass  # gone, as it should be
        report["healthy_after_soak"] = await wait_healthy(proc, url, session, RECOVERY_TIMEOUT_S)
        after = await ask_alone(session, url, model, run.now)
        report["after_soak"] = {kind: {**asdict(o), "identical": o.status == 200 and not o.lost
                                       and o.text == run.references[kind]} for kind, o in after.items()}
        report["after_soak_identical"] = all(a["identical"] for a in report["after_soak"].values())
        async with session.get(f"{url}/workers") as r:
            report["workers_at_end"] = await r.json()
    return report


def seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f}"


def table(report: dict) -> str:
    rows = [("duration (s)", f"{report['duration_s']:.1f}"), ("requests sent", report["requests_sent"]),
            ("answered right", report["answered_right"]), ("answered wrong (target 0)", report["answered_wrong"]),
            ("hostile answered 200", report["hostile_answered_200"]), ("refused with 4xx", report["refused_4xx"]),
            ("failed by a worker fault (503)", report["failed_503_worker_fault"]),
            ("failed with other 5xx", report["failed_other_5xx"]),
            (f"lost (no answer within {REQUEST_TIMEOUT_S:g} s; target 0)", report["lost"]),
            ("hung up by the client (planned)", report["hung_up_by_client"]),
            ("outcomes other than expected", report["unexpected_outcomes"]),
            ("worker faults", len(report["faults"])),
            ("peak RSS, server + workers (MiB)", f"{report['peak_rss_mib']:.0f}"),
            ("peak RSS by process (MiB)",
             ", ".join(f"{k} {v:.0f}" for k, v in report["peak_rss_mib_by_process"].items())),
            ("normal requests alone after the soak", "identical" if report["after_soak_identical"] else "NOT identical")]
    lines = ["| soak | |", "|---|---:|", *(f"| {label} | {value} |" for label, value in rows), ""]
    columns = ("right", "wrong", "200", "4xx", "503 fault", "other 5xx", "lost", "hung up", "unexpected")
    lines += ["| kind | expected | sent | " + " | ".join(columns) + " | 4xx statuses | median s | max s |",
              "|---|---|" + "---:|" * (len(columns) + 1) + "---|---:|---:|"]
    for kind, k in report["kinds"].items():
        statuses = ", ".join(f"{s}×{n}" for s, n in sorted(k["4xx_statuses"].items()))
        lines.append(f"| {kind} | {k['expected']} | {k['sent']} | " + " | ".join(str(k[c]) for c in columns)
                     + f" | {statuses} | {k['median_s']:.2f} | {k['max_s']:.2f} |")
    lines += ["", "| fault | at (s) | worker | signal | pid | /health not 200 after (s) | 200 again after (s) | new pid |",
              "|---:|---:|---|---|---:|---:|---:|---:|"]
    for i, f in enumerate(report["faults"], 1):
        lines.append(f"| {i} | {f['at']:.1f} | {f['worker']} | {f['signal']} | {f['pid']} | "
                     f"{seconds(f['unhealthy_after_s'])} | {seconds(f['healthy_after_s'])} | {f['new_pid'] or '-'} |")
    return "\n".join(lines)


def surprises(report: dict, log_lines: list[str]) -> str:
    """The first example of each (kind, category) that was not as expected, and the server's log lines counted."""
    seen, lines = set(), []
    for s in report["surprises"]:
        if (s["kind"], s["category"]) in seen:
            continue
        seen.add((s["kind"], s["category"]))
        got = f"status {s['status']}" + (f", code {s['code']}" if s["code"] else "")
        detail = s["error"] or repr(s["text"][:120])
        wanted = f"; reference {s['reference']!r}" if s["reference"] is not None else ""
        lines.append(f"- {s['kind']} ({s['category']}, expected {s['expected']}) at {s['started']:.1f}-"
                     f"{s['ended']:.1f} s: {got}: {detail}{wanted}")
    for kind, a in report["after_soak"].items():
        if not a["identical"]:
            lines.append(f"- {kind} sent alone after the soak: status {a['status']}: {a['error'] or repr(a['text'])}; "
                         f"reference {report['references'][kind]!r}")
    if not report["healthy_after_soak"]:
        lines.append(f"- /health was not 200 within {RECOVERY_TIMEOUT_S:g} s after the soak")
    for key, what in (("stopped_workers_left_alive", "SIGSTOPped workers the server had not killed by the end"),
                      ("workers_outliving_server", "workers still alive after the server exited")):
        if report[key]:
            lines.append(f"- {what}: pids {report[key]}")
    counted = Counter(re.sub(r"\b[0-9a-f]{32}\b", "<id>", line) for line in log_lines if line.strip())
    if counted:
        lines += ["", "server output (count × line):", *(f"  {n} × {line}" for line, n in counted.most_common(40))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, required=True, help="how long the clients keep sending")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint directory (default: the demo model)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "soak.json")
    p.add_argument("--seed", type=int, default=0, help="seeds the request mix and the fault times")
    p.add_argument("--concurrency", type=int, default=4, help="clients sending at once")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.concurrency < 1:
        p.error("--minutes must be positive and --concurrency at least 1")
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        folder = Path(tmp) / "media"
        folder.mkdir()
        log_path = Path(tmp) / "server.log"
        with open(log_path, "wb") as log:
            proc, url = start_server(args.model, folder, log)
            try:
                report = asyncio.run(soak(args, proc, url, folder))
            except BaseException:
                print("soak: the server's last output:\n" + "\n".join(log_path.read_text(errors="replace")
                                                                     .splitlines()[-40:]), file=sys.stderr)
                raise
            finally:
                workers = list(worker_processes(psutil.Process(proc.pid)).values()) if proc.poll() is None else []
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        log_lines = log_path.read_text(errors="replace").splitlines()
    _, outlived = psutil.wait_procs(workers, timeout=10)  # they get SIGTERM when the server exits
    for p in outlived:
        p.kill()
    report["workers_outliving_server"] = [p.pid for p in outlived]
    report["server_log"] = log_lines[-500:]
    print(table(report))
    if text := surprises(report, log_lines):
        print("\n" + text)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    config["commit"] = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                      text=True).stdout.strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": config, **report}, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    failed = report["lost"] or report["answered_wrong"] or report["worker_recovery_failed"] \
        or not report["after_soak_identical"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
