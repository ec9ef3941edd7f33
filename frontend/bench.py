"""`launch.py bench`: a serving benchmark in the manner of vLLM's benchmarks/benchmark_serving.py. Streams chat
requests, each a random image and a random prompt of a given token length with a fixed output length (ignore_eos),
at each concurrency of a sweep, and reports request and token throughput and mean / median / p99 of TTFT, TPOT,
ITL and end-to-end latency, as a table and as JSON.

Definitions as vLLM's: TTFT is the time to the first streamed text; ITL the gaps between streamed texts; TPOT a
request's (latency - TTFT) / (output tokens - 1); throughput counts completed requests over the level's wall time.
"""

import asyncio
import base64
import io
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
from PIL import Image
from tqdm import tqdm

from common.options import Options
from common.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
PERCENTILES = {"mean": None, "median": 50, "p99": 99}
SERVED = ("model", "dtype", "quantization", "visual_workers", "llm_workers", "visual_devices", "llm_devices", "tp")


def bench_options(p) -> None:
    Options.add_arguments(p, SERVED)  # the started server's; the model's tokenizer makes the prompts
    p.add_argument("--url", help="benchmark this running server (http://host:port) instead of starting one")
    p.add_argument("--image-size", default="1280x720", help="WIDTHxHEIGHT of the random images")
    p.add_argument("--input-len", type=int, default=128, help="prompt text tokens besides the image")
    p.add_argument("--output-len", type=int, default=256, help="tokens generated per request (ignore_eos)")
    p.add_argument("--num-prompts", type=int, default=64, help="requests per concurrency level")
    p.add_argument("--concurrency", default="1,2,4,8", help="comma-separated concurrency levels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench.json")


@dataclass
class Output:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0


def make_requests(args, tokenizer: Tokenizer) -> list[dict]:
    """Chat messages: a random image (JPEG data URI) then random text of about input_len tokens, as vLLM's random
    dataset (random token ids decoded; re-encoding may shift the count a little: usage reports the real one)."""
    width, height = (int(x) for x in args.image_size.lower().split("x"))
    rng = np.random.default_rng(args.seed)
    requests = []
    for _ in range(args.num_prompts):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="JPEG")
        text = tokenizer.decode(rng.integers(1000, 100_000, args.input_len).tolist())
        requests.append({"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()}},
            {"type": "text", "text": text},
        ]})
    return requests


async def send(client: aiohttp.ClientSession, url: str, model: str, message: dict, output_len: int) -> Output:
    body = {"model": model, "messages": [message], "max_completion_tokens": output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    out = Output()
    start = last = time.perf_counter()
    try:
        async with client.post(f"{url}/v1/chat/completions", json=body) as r:
            if r.status != 200:
                out.error = (await r.read()).decode()
                return out
            async for line in r.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out.error = chunk["error"]["message"]
                    return out
                if chunk.get("usage"):
                    out.prompt_tokens, out.output_tokens = chunk["usage"]["prompt_tokens"], chunk["usage"]["completion_tokens"]
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    now = time.perf_counter()
                    if out.ttft == 0.0:
                        out.ttft = now - start
                    else:
                        out.itl.append(now - last)
                    last = now
        out.latency = time.perf_counter() - start
        out.ok = True
    except aiohttp.ClientError as e:
        out.error = f"{type(e).__name__}: {e}"
    return out


async def warm_up(url: str, model: str, message: dict, output_len: int) -> Output:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as client:
        return await send(client, url, model, message, output_len)


async def run_level(url: str, model: str, requests: list[dict], output_len: int, concurrency: int) -> tuple[list[Output], float]:
    limit = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(requests), desc=f"concurrency {concurrency}", unit="req", file=sys.stderr)
    session = dict(timeout=aiohttp.ClientTimeout(total=None), connector=aiohttp.TCPConnector(limit=concurrency))
    async with aiohttp.ClientSession(**session) as client:
        async def one(message):
            async with limit:
                out = await send(client, url, model, message, output_len)
            bar.update()
            return out

        start = time.perf_counter()
        outputs = await asyncio.gather(*(one(m) for m in requests))
        duration = time.perf_counter() - start
    bar.close()
    return outputs, duration


def stats(values: list[float]) -> dict:
    """mean / median / p99 in milliseconds (0 when there are none, as vLLM reports)."""
    v = np.asarray(values or [0.0]) * 1000
    return {name: float(v.mean() if q is None else np.percentile(v, q)) for name, q in PERCENTILES.items()}


def metrics(outputs: list[Output], duration: float, concurrency: int) -> dict:
    done = [o for o in outputs if o.ok]
    out_tokens = sum(o.output_tokens for o in done)
    return {
        "concurrency": concurrency,
        "completed": len(done),
        "failed": len(outputs) - len(done),
        "duration_s": duration,
        "total_input_tokens": sum(o.prompt_tokens for o in done),
        "total_output_tokens": out_tokens,
        "request_throughput": len(done) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + sum(o.prompt_tokens for o in done)) / duration,
        "ttft_ms": stats([o.ttft for o in done]),
        "tpot_ms": stats([(o.latency - o.ttft) / (o.output_tokens - 1) for o in done if o.output_tokens > 1]),
        "itl_ms": stats([x for o in done for x in o.itl]),
        "e2el_ms": stats([o.latency for o in done]),
    }


def table(levels: list[dict]) -> str:
    rows = [("successful requests", "completed", "{:.0f}"), ("failed requests", "failed", "{:.0f}"),
            ("duration (s)", "duration_s", "{:.2f}"), ("input tokens (image + text)", "total_input_tokens", "{:.0f}"),
            ("output tokens", "total_output_tokens", "{:.0f}"), ("request throughput (req/s)", "request_throughput", "{:.3f}"),
            ("output token throughput (tok/s)", "output_throughput", "{:.1f}"),
            ("total token throughput (tok/s)", "total_token_throughput", "{:.1f}")]
    for metric, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2E latency")):
        rows += [(f"{stat} {name} (ms)", (metric, stat), "{:.1f}") for stat in PERCENTILES]
    lines = ["| concurrency | " + " | ".join(str(m["concurrency"]) for m in levels) + " |",
             "|---|" + "---:|" * len(levels)]
    for label, key, fmt in rows:
        values = [m[key[0]][key[1]] if isinstance(key, tuple) else m[key] for m in levels]
        lines.append(f"| {label} | " + " | ".join(fmt.format(v) for v in values) + " |")
    return "\n".join(lines)


def start_server(args, max_batch: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    served = Options.from_args(args).argv(SERVED)
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "serve", *served, "--port", str(port),
                             "--max-batch", str(max_batch)], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited while starting (exit code {proc.returncode})")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5):
                return proc, url
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            proc.terminate()
            raise TimeoutError("the server did not answer /health within 300 s")
        time.sleep(0.5)


def bench(args) -> int:
    levels = [int(c) for c in args.concurrency.split(",")]
    if min(levels) < 1 or args.num_prompts < 1 or args.output_len < 1 or args.input_len < 1:
        raise ValueError("--concurrency levels, --num-prompts, --input-len and --output-len must be positive")
    requests = make_requests(args, Tokenizer.from_dir(args.model))
    proc, url = (None, args.url.rstrip("/")) if args.url else start_server(args, max(levels))
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as r:
            model = json.load(r)["data"][0]["id"]
        warm = asyncio.run(warm_up(url, model, requests[0], args.output_len))
        if not warm.ok:
            raise RuntimeError(f"the warm-up request failed: {warm.error}")
        results = []
        for c in levels:
            outputs, duration = asyncio.run(run_level(url, model, requests, args.output_len, c))
            if errors := [o.error for o in outputs if not o.ok]:
                print(f"concurrency {c}: {len(errors)} requests failed, first: {errors[0]}", file=sys.stderr)
            results.append(metrics(outputs, duration, c))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    print(table(results))
    if len(levels) > 1:
        print(f"output token throughput, concurrency {levels[-1]} / {levels[0]}: "
              f"{results[-1]['output_throughput'] / results[0]['output_throughput']:.2f}x")
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": config, "levels": results}, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
