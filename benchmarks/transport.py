"""Times moving one 7B-size image embedding ([1280, 3584] bfloat16) from the visual worker's process to the LLM
worker's, exactly as the workers do it, against plain in-process copies of the same bytes.

    python -m benchmarks.transport [--repeats 50] [--threads 1] [--vit-seconds S] [--out results/transport.json]

A sender process (the visual worker's part: PUB bound, requests PULLed) answers each tiny request from this process
with one "embeds" message carrying the real fields and the embedding split into chunk_width-wide frames; this
process (the LLM worker's part: SUB) times from sending the request until decode + assemble_chunks has rebuilt the
tensor. So every socket time is a round trip: sender-side split + encode, the embeds message, reassembly, plus one
tiny request hop, whose cost the ping round trip (tiny request, tiny reply) bounds from above.
"""

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import torch
import zmq

from common.messages import Cancel, Embeds, SamplingParams
from common.protocol import assemble_chunks, decode, encode, hidden_chunks

GRID = [1, 64, 80]  # 5120 patches → 1280 tokens after the 2x2 merge: the seed deployment's token budget
ROWS = GRID[0] * GRID[1] * GRID[2] // 4
HIDDEN = 3584  # Qwen2.5-VL-7B's LLM hidden size, which the ViT's merger projects to
IMAGE_PAD, VISION_START, VISION_END = 151655, 151652, 151653
PROMPT_IDS = [151644, 872, 198, VISION_START, IMAGE_PAD, VISION_END, 151645, 198, 151644, 77091, 198]
WIDTHS = (640, HIDDEN)  # the default chunk width, and the whole hidden dimension as one frame
WARMUP = 5
# The copies here are memory-bound: a second thread buys little, and with two processes on a small machine its
# OpenMP wake-ups and spinning end up in the timings instead of the transport. --threads overrides.
THREADS = 1
HANDSHAKE_TIMEOUT_S = 60  # the sender imports torch before it connects
REPLY_TIMEOUT_S = 10


def image_embeds() -> torch.Tensor:
    """The same (ROWS, HIDDEN) bfloat16 embedding in every process."""
    return torch.randn(ROWS, HIDDEN, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)


def embeds_message(rid: str, embeds: torch.Tensor, width: int) -> Embeds:
    """What VisualWorker.embed returns for one image of GRID."""
    return Embeds(rid, PROMPT_IDS, [tuple(GRID)], [], [], SamplingParams(), HIDDEN, width, "bfloat16",
                  hidden_chunks("image", embeds, width), {"preprocess_s": 0.0, "vit_s": 0.0, "sent_at": time.time()})


def assemble_embeds(msg: Embeds) -> torch.Tensor:
    """What LLMWorker.start does with a decoded embeds message before prefill: rows from the grid, reassemble."""
    rows = sum(t * h * w for t, h, w in msg.image_grid_thw) // 4
    return assemble_chunks(msg, "image", rows)


# ---- the sender process ----


def serve(embeds_endpoint: str, requests_endpoint: str, threads: int) -> None:
    """Answers each request (a ping naming `reply` and `chunk_width`) on the PUB socket until told to stop."""
    torch.set_num_threads(threads)
    embeds = image_embeds()
    ctx = zmq.Context.instance()
    requests = ctx.socket(zmq.PULL)
    requests.connect(requests_endpoint)
    pub = ctx.socket(zmq.PUB)
    pub.bind(embeds_endpoint)
    parent = os.getppid()
    while os.getppid() == parent:
        if not requests.poll(200):
            continue
        rid, reply, width = msgpack.unpackb(requests.recv())  # this benchmark's own control message
        if reply == "stop":
            break
        if reply == "ping":
            pub.send_multipart(encode(Cancel(rid)))  # the smallest message that names a request
        else:
            pub.send_multipart(encode(embeds_message(rid, embeds, width)), copy=False)
    pub.close(linger=0)
    requests.close(linger=0)


# ---- the receiving side ----


class Receiver:
    """This process's end: PUSHes requests to the sender, SUBscribes to its replies."""

    def __init__(self, transport: str, tmpdir: str, threads: int):
        ctx = zmq.Context.instance()
        self.requests = ctx.socket(zmq.PUSH)
        self.requests.bind(f"ipc://{tmpdir}/requests" if transport == "ipc" else "tcp://127.0.0.1:*")
        requests_endpoint = self.requests.getsockopt_string(zmq.LAST_ENDPOINT)
        embeds_endpoint = f"ipc://{tmpdir}/embeds" if transport == "ipc" else free_tcp_endpoint()
        spawn = multiprocessing.get_context("spawn")
        self.sender = spawn.Process(target=serve, args=(embeds_endpoint, requests_endpoint, threads),
                                    daemon=True)
        self.sender.start()
        self.sub = ctx.socket(zmq.SUB)
        self.sub.connect(embeds_endpoint)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.count = 0

    def handshake(self) -> None:
        """PUB drops whatever it sends before our subscription reaches it: ping every 100 ms until one comes back."""
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
        while True:
            try:
                self.request("ping", flags=zmq.NOBLOCK)
            except zmq.Again:  # the sender has not connected yet
                time.sleep(0.1)
            if self.sub.poll(100):
                self.sub.recv_multipart(copy=False)
                return
            if not self.sender.is_alive() or time.monotonic() > deadline:
                raise SystemExit(f"the sender process did not answer within {HANDSHAKE_TIMEOUT_S} s")

    def request(self, reply: str, width: int = 0, flags: int = 0) -> str:
        self.count += 1
        rid = str(self.count)
        self.requests.send(msgpack.packb([rid, reply, width]), flags)
        return rid

    def reply(self, rid: str):
        """The decoded reply to `rid`, as LLMWorker.receive decodes it; late replies to handshake pings are skipped."""
        while True:
            if not self.sub.poll(REPLY_TIMEOUT_S * 1000):
                raise SystemExit(f"no reply from the sender process within {REPLY_TIMEOUT_S} s")
            msg = decode(self.sub.recv_multipart(copy=False))
            if msg.id == rid:
                return msg

    def embeds_round_trip(self, width: int) -> torch.Tensor:
        return assemble_embeds(self.reply(self.request("embeds", width)))

    def ping_round_trip(self) -> None:
        self.reply(self.request("ping"))

    def close(self) -> None:
        self.request("stop")
        self.sender.join(timeout=10)
        self.sub.close(linger=0)
        self.requests.close(linger=0)


def free_tcp_endpoint() -> str:
    probe = zmq.Context.instance().socket(zmq.PUB)
    probe.bind("tcp://127.0.0.1:*")
    endpoint = probe.getsockopt_string(zmq.LAST_ENDPOINT)
    probe.close(linger=0)
    return endpoint


# ---- measurements ----


def time_calls(fn, repeats: int) -> list[float]:
    """Seconds of `repeats` calls of `fn` after WARMUP untimed ones."""
    for _ in range(WARMUP):
        fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def row(path: str, width: int | None, seconds: list[float], payload: int) -> dict:
    median = statistics.median(seconds)
    return {
        "path": path, "chunk_width": width, "chunks": -(-HIDDEN // width) if width else 1,
        "median_ms": median * 1e3, "p90_ms": statistics.quantiles(seconds, n=10)[-1] * 1e3,
        "mb_per_s": payload / median / 1e6,
    }


def in_process_rows(embeds: torch.Tensor, repeats: int) -> list[dict]:
    """The same bytes without another process: a plain copy; the split, per-chunk contiguous copies and cat the
    chunking costs; and the whole protocol (split, encode, decode, assemble) with no socket in between."""
    rows = [row("in-process copy", None, time_calls(lambda: torch.empty_like(embeds).copy_(embeds), repeats),
                embeds.nbytes)]
    for width in WIDTHS:
        def split_cat():
            return torch.cat([c.contiguous() for c in embeds.split(width, dim=1)], dim=1)

        def protocol():
            return assemble_embeds(decode(encode(embeds_message("0", embeds, width))))

        rows.append(row("split+contiguous+cat", width, time_calls(split_cat, repeats), embeds.nbytes))
        rows.append(row("protocol, no socket", width, time_calls(protocol, repeats), embeds.nbytes))
    return rows


def socket_rows(transport: str, embeds: torch.Tensor, repeats: int, threads: int) -> tuple[list[dict], float]:
    """Round trips through a sender process for each chunk width, and the median ping round trip in ms."""
    with tempfile.TemporaryDirectory(prefix="qvl-transport-") as tmpdir:
        receiver = Receiver(transport, tmpdir, threads)
        try:
            receiver.handshake()
            for width in WIDTHS:
                if not torch.equal(receiver.embeds_round_trip(width), embeds):
                    raise SystemExit(f"{transport}, chunk width {width}: the reassembled embedding is not the sent one")
            ping_ms = statistics.median(time_calls(receiver.ping_round_trip, repeats)) * 1e3
            rows = []
            for width in WIDTHS:
                seconds = time_calls(lambda: receiver.embeds_round_trip(width), repeats)
                rows.append(row(f"{transport} round trip", width, seconds, embeds.nbytes))
        finally:
            receiver.close()
    return rows, ping_ms


def vit_seconds(flag: float | None, model_results: Path) -> tuple[float | None, str]:
    """The ViT time to compare with, and where it came from: the flag, else our ViT row of the model benchmark."""
    if flag is not None:
        return flag, "--vit-seconds"
    if not model_results.is_file():
        return None, f"no --vit-seconds and no {model_results}"
    record = json.loads(model_results.read_text())
    seconds = next((r["ours"] for r in record.get("rows", []) if r.get("row") == "ViT s"), None)
    if seconds is None:
        return None, f"{model_results} has no 'ViT s' row"
    return seconds, f"{model_results}: ours, 'ViT s' row; model {record.get('model')}, grid {record.get('grid')}"


# ---- report ----


def table(rows: list[dict], vit_s: float | None) -> str:
    lines = [f"{'path':24}{'width':>7}{'chunks':>8}{'median ms':>11}{'p90 ms':>9}{'MB/s':>9}{'% ViT':>8}"]
    for r in rows:
        width = str(r["chunk_width"]) if r["chunk_width"] else "-"
        share = f"{r['vit_percent']:8.3f}" if vit_s else f"{'-':>8}"
        lines.append(f"{r['path']:24}{width:>7}{r['chunks']:>8}{r['median_ms']:11.2f}{r['p90_ms']:9.2f}"
                     f"{r['mb_per_s']:9.0f}{share}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50, help=f"timed runs per row, after {WARMUP} warm-up runs")
    parser.add_argument("--vit-seconds", type=float, help="ViT time to compare with (default: from --model-results)")
    parser.add_argument("--model-results", type=Path, default=Path("results/model.json"),
                        help="the model benchmark's JSON, read for our ViT seconds")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads in each of the two processes")
    parser.add_argument("--out", type=Path, default=Path("results/transport.json"))
    args = parser.parse_args()
    if args.repeats < 2:
        parser.error(f"--repeats must be at least 2 to give a p90, got {args.repeats}")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")

    torch.set_num_threads(args.threads)
    embeds = image_embeds()
    rows = in_process_rows(embeds, args.repeats)
    ping_ms = {}
    for transport in ("ipc", "tcp"):
        print(f"timing {transport} ...", file=sys.stderr, flush=True)
        transport_rows, ping_ms[transport] = socket_rows(transport, embeds, args.repeats, args.threads)
        rows += transport_rows
    vit_s, vit_source = vit_seconds(args.vit_seconds, args.model_results)
    for r in rows:
        r["vit_percent"] = r["median_ms"] / 1e3 / vit_s * 100 if vit_s else None

    print(f"image embedding {list(embeds.shape)} bfloat16, {embeds.nbytes / 1e6:.2f} MB; {args.repeats} runs after "
          f"{WARMUP} warm-up; torch threads {args.threads} per process")
    print("socket rows are round trips: tiny request → embeds message (split, encode, send, decode, assemble_chunks)")
    print(f"ping round trip (tiny request + tiny reply), median: ipc {ping_ms['ipc']:.3f} ms, "
          f"tcp {ping_ms['tcp']:.3f} ms")
    print(table(rows, vit_s))
    print(f"ViT time: {f'{vit_s:.3f} s' if vit_s else 'none'} ({vit_source}); target: socket rows < 1% of it")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"shape": list(embeds.shape), "dtype": "bfloat16", "bytes": embeds.nbytes, "repeats": args.repeats,
              "warmup": WARMUP, "torch_threads": args.threads, "ping_round_trip_ms": ping_ms,
              "vit_seconds": vit_s, "vit_source": vit_source, "rows": rows}
    args.out.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
