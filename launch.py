"""Starts the visual worker and the LLM worker as separate processes joined by ZeroMQ, sends them a request and
streams the answer; `replay FILE` feeds a recorded queue into a fresh LLM worker.

    python launch.py                                   # embedded default model, bundled example image
    python launch.py --model DIR --image cat.jpg --prompt "What is this?" [--json]
    python launch.py replay run.qvl [--json]
    python launch.py serve --model DIR [--host 127.0.0.1] [--port 8000] [--max-batch 8]
    python launch.py bench [--model DIR | --url http://127.0.0.1:8000] [--concurrency 1,2,4,8]
    python launch.py eval --data MMBench_DEV_EN.tsv [--limit N] [--out preds.jsonl] [--mode mcq|open]
"""

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

import torch
import zmq

from common.protocol import Message, ProtocolError, decode
from frontend.client import READY_TIMEOUT_S, Frontend, Recorder, WorkerDied, fetch, read_recording, read_video

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE / "examples" / "model"
DEFAULT_IMAGE = HERE / "examples" / "images" / "shapes.png"
DEFAULT_PROMPT = "What is written in the box?"


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
        front.start_workers(args, visual=True)
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
        front.start_workers(args, visual=False)
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
    if argv[:1] == ["eval"]:
        from frontend import eval as evaluation

        p = argparse.ArgumentParser(prog="launch.py eval", description=evaluation.__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        worker_options(p)
        evaluation.add_arguments(p)
        return evaluation.run(p.parse_args(argv[1:]))
    if argv[:1] == ["serve"]:
        from frontend.server import serve, serve_options

        p = argparse.ArgumentParser(prog="launch.py serve", description="OpenAI-compatible chat API over HTTP")
        worker_options(p)
        serve_options(p)
        return serve(p.parse_args(argv[1:]))
    if argv[:1] == ["bench"]:
        from frontend.bench import bench, bench_options

        p = argparse.ArgumentParser(prog="launch.py bench", description="serving benchmark in the manner of vLLM's")
        bench_options(p, DEFAULT_MODEL)
        return bench(p.parse_args(argv[1:]))
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
