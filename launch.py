"""Starts the visual worker and the LLM worker as separate processes joined by ZeroMQ, sends them a request and
streams the answer; `replay FILE` feeds a recorded queue into a fresh LLM worker.

    python launch.py                                   # embedded default model, bundled example image
    python launch.py --model DIR --image cat.jpg --prompt "What is this?" [--json]
    python launch.py replay run.qvl [--json]
    python launch.py serve --model DIR [--host 127.0.0.1] [--port 8000] [--max-batch 8]
    python launch.py bench [--model DIR | --url http://127.0.0.1:8000] [--concurrency 1,2,4,8]
    python launch.py eval --data MMBench_DEV_EN.tsv [--limit N] [--out preds.jsonl] [--mode mcq|open]
    python launch.py keys DIR                          # CURVE keys; then --transport tcp --curve-keys DIR
    python launch.py compile --model DIR [--buckets 1024,4096,5120] [--target llvm|cuda] [--tune-trials N]
"""

import argparse
import asyncio
import json
import os
import re
import sys
import time
from pathlib import Path

import zmq

from common.messages import Embeds, Ping, SamplingParams
from common.options import Options
from common.protocol import BROADCAST, decode, encode, topic
from frontend.media import MediaPolicy, fetch_image, read_video
from frontend.pipeline import READY_TIMEOUT_S, Pipeline, collect
from frontend.processes import WorkerDied
from frontend.prompt import Prompter, user_message
from common.security import Curve, write_keys
from frontend.recording import Recorder, read_recording

HERE = Path(__file__).resolve().parent
DEFAULT_IMAGE = HERE / "examples" / "images" / "shapes.png"
DEFAULT_PROMPT = "What is written in the box?"
OPERATOR_MEDIA = MediaPolicy(allowed_local_media_path=Path("/"), allow_private_urls=True)  # the command line's user


def print_result(result: dict, as_json: bool) -> None:
    print()
    if as_json:
        print(json.dumps(result))
    else:
        t = result["timings"]
        print(f"[{result['finish_reason']}: {result['prompt_tokens']} prompt + {result['completion_tokens']} "
              f"generated tokens; " + ", ".join(f"{k} {v:.3f}" for k, v in t.items()) + "]", file=sys.stderr)


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def absolute(source: str) -> str:
    """A command-line path as the media fetcher takes it (absolute); URLs and data URIs as they are."""
    return source if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", source) else os.path.abspath(source)


async def read_media(args) -> tuple[list[bytes], object]:
    images = [await fetch_image(absolute(s), OPERATOR_MEDIA) for s in args.image]
    video = await read_video(absolute(args.video), args.fps, OPERATOR_MEDIA) if args.video else None
    return images, video


def run(args) -> int:
    options = Options.from_args(args)
    options.check()
    images, video = asyncio.run(read_media(args))
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed)
    pipeline = Pipeline(options)
    recorder = None
    try:
        pipeline.start()
        recorder = Recorder(pipeline.endpoints.embeds, args.record, pipeline.curve) if args.record else None
        pipeline.wait_ready(idle=recorder.poll if recorder else None)
        while recorder is not None and not recorder.live:
            recorder.poll()
            time.sleep(0.05)
        prompter = Prompter(options.model, pipeline.context_len)
        request = prompter.request(user_message(args.prompt, images, video, args.fps), sampling)
        print_result(collect(pipeline, request, write), args.json)
        return 0
    finally:
        if recorder is not None:
            recorder.close()
        pipeline.close()


def replay(args) -> int:
    recording = read_recording(args.file)
    options = Options.from_args(args)
    pipeline = Pipeline(options)
    try:
        pub = zmq.Context.instance().socket(zmq.PUB)
        if options.curve_keys is not None:  # the LLM worker connects to what it takes for the visual worker
            Curve(options.curve_keys, "visual").serve(pub)
        pub.bind(pipeline.endpoints.embeds[0])
        pipeline.start(("llm",))
        # the LLM worker reports ready once a ping has reached it
        pipeline.wait_ready(("llm",), idle=lambda: pub.send_multipart([BROADCAST, *encode(Ping())]))
        llm = pipeline.ready("llm")[0]

        def publish(frames: list[bytes], msg) -> None:
            if isinstance(msg, Embeds):
                pipeline.track(msg.id, llm)
            pub.send_multipart([topic(llm), *frames])

        for frames in recording:
            msg = decode(frames)
            if isinstance(msg, Embeds):  # its answer is printed before the next message goes
                print_result(collect(pipeline, msg, write, send=lambda m: publish(frames, m)), args.json)
            else:
                publish(frames, msg)
        pub.close(linger=0)
        return 0
    finally:
        pipeline.close()


def main(argv: list[str]) -> int:
    if argv[:1] == ["replay"]:
        p = argparse.ArgumentParser(prog="launch.py replay", description="replay a recorded queue into a fresh LLM worker")
        p.add_argument("file")
        Options.add_arguments(p)
        p.add_argument("--json", action="store_true", help="last line of stdout: each result as one JSON object")
        return replay(p.parse_args(argv[1:]))
    if argv[:1] == ["keys"]:
        p = argparse.ArgumentParser(prog="launch.py keys", description="write a CURVE keypair for each process role "
                                    "(frontend, visual, llm) into DIR; give every process DIR as --curve-keys")
        p.add_argument("dir", type=Path)
        for path in write_keys(p.parse_args(argv[1:]).dir):
            print(path)
        return 0
    if argv[:1] == ["compile"]:
        from visual_worker import tvm_backend

        p = argparse.ArgumentParser(prog="launch.py compile", description=tvm_backend.COMPILE_HELP)
        tvm_backend.compile_arguments(p)
        return tvm_backend.compile_command(p.parse_args(argv[1:]))
    if argv[:1] == ["eval"]:
        from frontend import eval as evaluation

        p = argparse.ArgumentParser(prog="launch.py eval", description=evaluation.__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        Options.add_arguments(p)
        evaluation.add_arguments(p)
        return evaluation.run(p.parse_args(argv[1:]))
    if argv[:1] == ["serve"]:
        from frontend.server import serve, serve_options

        p = argparse.ArgumentParser(prog="launch.py serve", description="OpenAI-compatible chat API over HTTP")
        Options.add_arguments(p)
        serve_options(p)
        return serve(p.parse_args(argv[1:]))
    if argv[:1] == ["bench"]:
        from frontend.bench import bench, bench_options

        p = argparse.ArgumentParser(prog="launch.py bench", description="serving benchmark in the manner of vLLM's")
        bench_options(p)
        return bench(p.parse_args(argv[1:]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    Options.add_arguments(p)
    p.add_argument("--image", action="append", default=None, help="path, http(s) URL or data URI; repeatable")
    p.add_argument("--video", help="video file (decoded with PyAV) or a folder of frame images")
    p.add_argument("--fps", type=float, default=2.0, help="video frames per second to sample")
    p.add_argument("--prompt", default=None)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--record", help="write the embeds queue to this file for `launch.py replay`")
    p.add_argument("--json", action="store_true", help="last line of stdout: the result as one JSON object")
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
    except (WorkerDied, RuntimeError, ValueError, OSError, TimeoutError) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        sys.exit(1)
