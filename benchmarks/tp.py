"""Decode tokens/s of our LLM half with tensor parallelism (--tp 1 vs 2, llm_worker/parallel.py), and what the
all-reduces and the broadcast of each step's inputs cost.

Weights are random in the real 3B shape (benchmarks/model.py builds and caches them), bfloat16, unless --model names
a checkpoint. Each TP size runs in a fresh subprocess with the machine's cores split among its ranks (TP=1: one
process with every core; TP=2: two processes with half each). Each batch row holds a prompt of --prompt-len random
tokens; after --warmup steps, --steps greedy decode steps are timed (best of --rounds). The collectives are timed on
their own in a two-rank gloo group: an all-reduce of one step's (batch, 1, hidden) output, two per layer, and the
three broadcasts rank 0 makes before each forward.

    python -m benchmarks.tp [--quick] [--model DIR] [--batch 1,4] [--steps 32] [--out results/tp.json]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing

from benchmarks.model import busy_cpu_seconds, children_cpu_seconds, ensure_checkpoint
from common.config import load_config
from common.messages import SamplingParams
from common.options import Options
from llm_worker import parallel
from llm_worker.engine import Engine
from llm_worker.model import LanguageModel

ROOT = Path(__file__).resolve().parents[1]


def decode_worker(model_dir: Path, tp: int, batches: list[int], prompt_len: int, warmup: int, steps: int,
                  rounds: int) -> dict:
    """Decode tok/s at each batch size for one TP size (this process is rank 0)."""
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    start = time.perf_counter()
    if tp == 1:
        model = LanguageModel.from_pretrained(model_dir, torch.bfloat16)
    else:
        model = parallel.launch(Options(model=model_dir, dtype="bfloat16", tp=tp), "cpu")
    result = {"tp": tp, "load_s": time.perf_counter() - start, "threads_per_rank": torch.get_num_threads()}
    ids = torch.randint(0, 150000, (prompt_len,), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(max_new_tokens=warmup + steps + 1, ignore_eos=True)
    with torch.inference_mode():
        for batch in batches:
            best = 0.0
            for _ in range(rounds):
                engine = Engine(model, max_batch=batch, max_len=prompt_len + warmup + steps + 2)
                for _ in range(batch):
                    engine.add(model.embed(ids), torch.arange(prompt_len).expand(3, -1), 0, params, [])
                for _ in range(warmup):
                    engine.step()
                t = time.perf_counter()
                for _ in range(steps):
                    engine.step()
                best = max(best, batch * steps / (time.perf_counter() - t))
                del engine
            result[f"decode_tok_s_b{batch}"] = best
    if tp > 1:
        model.close()
    return result


def collective_rank(rank: int, port: int, hidden: int, batches: list[int], repeats: int, out: str) -> None:
    """One of two gloo ranks (one thread each): µs per all-reduce of (batch, 1, hidden) bf16, and per step-input
    broadcast (header, ints, embeddings of one decode step)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    result = {}
    for batch in batches:
        x = torch.randn(batch, 1, hidden, dtype=torch.bfloat16)
        header, ints = torch.zeros(parallel.HEADER, dtype=torch.int64), torch.zeros(4 * batch, dtype=torch.int64)
        for name, op in (("all_reduce_us", lambda: dist.all_reduce(x)),
                         ("broadcast_us", lambda: [dist.broadcast(t, 0) for t in (header, ints, x)])):
            for _ in range(repeats // 10):
                op()
            dist.barrier()
            t = time.perf_counter()
            for _ in range(repeats):
                op()
            result[f"{name}_b{batch}"] = (time.perf_counter() - t) / repeats * 1e6
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def collectives(hidden: int, batches: list[int], repeats: int = 2000) -> dict:
    out = ROOT / "results" / ".collectives.json"
    out.parent.mkdir(exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(collective_rank, args=(port, hidden, batches, repeats, str(out)), nprocs=2)
    result = json.loads(out.read_text())
    out.unlink()
    return result


def spawn_decode(args, tp: int) -> dict:
    print(f"decoding with --tp {tp} ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "benchmarks.tp", "--worker", str(tp), "--model", str(args.model),
           "--batch", args.batch, "--prompt-len", str(args.prompt_len), "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--rounds", str(args.rounds)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"--tp {tp} failed with exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint dir (default: random 3B-shape weights, cached)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/qwen-vl-disagg")
    parser.add_argument("--quick", action="store_true", help="the 3B shape with 4 layers")
    parser.add_argument("--tp", default="1,2", help="TP sizes to run, comma-separated")
    parser.add_argument("--batch", default="1,4", help="decode batch sizes, comma-separated")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens in each batch row")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results/tp.json"))
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    if args.worker:
        print(json.dumps(decode_worker(args.model, args.worker, batches, args.prompt_len, args.warmup, args.steps,
                                       args.rounds)))
        return
    if args.model is None:
        name = "bench-quick-random" if args.quick else "bench-3b-random"
        args.model = ensure_checkpoint(args.cache / name, args.quick)
    config = load_config(args.model).text
    busy, ours, start = busy_cpu_seconds(), children_cpu_seconds(), time.perf_counter()
    runs = [spawn_decode(args, int(tp)) for tp in args.tp.split(",")]
    others = ((busy_cpu_seconds() - busy) - (children_cpu_seconds() - ours)) / (time.perf_counter() - start)
    print("timing the collectives (two gloo ranks) ...", file=sys.stderr, flush=True)
    comm = collectives(config.hidden_size, batches)
    layers = config.num_hidden_layers
    rows = []
    for batch in batches:
        for run in runs:
            tok_s = run[f"decode_tok_s_b{batch}"]
            step_ms = batch / tok_s * 1e3
            row = {"tp": run["tp"], "batch": batch, "decode_tok_s": tok_s, "step_ms": step_ms}
            if run["tp"] > 1:
                reduce_ms = 2 * layers * comm[f"all_reduce_us_b{batch}"] / 1e3
                row.update(all_reduce_ms_per_step=reduce_ms, all_reduce_ms_per_token=reduce_ms / batch,
                           broadcast_ms_per_step=comm[f"broadcast_us_b{batch}"] / 1e3,
                           comm_share_of_step=(reduce_ms + comm[f"broadcast_us_b{batch}"] / 1e3) / step_ms)
            rows.append(row)
    report = {"model": str(args.model), "layers": layers, "hidden": config.hidden_size, "cores": os.cpu_count(),
              "prompt_len": args.prompt_len, "steps": args.steps, "other_processes_busy_cores": others, "runs": runs,
              "collectives_us": comm, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"{layers} layers, hidden {config.hidden_size}, {os.cpu_count()} cores, prompt {args.prompt_len} tokens, "
          f"{args.steps} timed steps; all-reduces: 2 per layer per step; other processes kept {others:.2f} cores busy "
          "during the decode runs")
    print("| TP | batch | decode tok/s | step ms | all-reduce ms/step | all-reduce ms/token | broadcast ms/step | "
          "comm share of step |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        comm_cells = (f"{r['all_reduce_ms_per_step']:.2f} | {r['all_reduce_ms_per_token']:.2f} | "
                      f"{r['broadcast_ms_per_step']:.3f} | {r['comm_share_of_step']:.0%}") if r["tp"] > 1 else \
            "– | – | – | –"
        print(f"| {r['tp']} | {r['batch']} | {r['decode_tok_s']:.2f} | {r['step_ms']:.1f} | {comm_cells} |")


if __name__ == "__main__":
    main()
