"""Where one decode step of our LLM half goes, against reading its weights: batch 1 at a long context (the KV cache
filled with random values, so no prefill is needed), bfloat16, on the random 3B-shape checkpoint of
benchmarks/model.py. For each thread count, interleaved: the step's best time, the read bandwidth of a 1 GiB float32
sum (the ceiling: weights and cache bytes / bandwidth), and torch.profiler's self CPU time per op over a few steps.
--rounds repeats the thread counts in turn and keeps each one's fastest round.

    python -m benchmarks.decode_step [--model DIR] [--context 1200] [--threads 1 2] [--rounds 2]
                                     [--out results/decode_step.json]
"""

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.model import GIB
from llm_worker.model import LanguageModel

STEPS, PROFILED = 8, 3


def decode_step(model: LanguageModel, cache, position: int) -> torch.Tensor:
    x = torch.randn(1, 1, model.config.hidden_size, dtype=model.dtype)  # (B, S, C): one new token's embedding
    return model(x, torch.full((3, 1, 1), position), torch.tensor([[position]]), cache, torch.tensor([0]))


def measure(model: LanguageModel, context: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    cache = model.new_cache(1, context + STEPS + PROFILED + 2)
    for layer in (*cache.k, *cache.v):
        layer.normal_()
    data = torch.ones(GIB // 4)
    decode_step(model, cache, context)
    steps, sums = [], []
    for i in range(STEPS):
        start = time.perf_counter()
        decode_step(model, cache, context + 1 + i)
        steps.append(time.perf_counter() - start)
        start = time.perf_counter()
        data.sum()
        sums.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for i in range(PROFILED):
            decode_step(model, cache, context + 1 + STEPS + i)
    ops = sorted(((e.key, e.self_cpu_time_total / 1e6 / PROFILED, e.count // PROFILED) for e in prof.key_averages()),
                 key=lambda op: -op[1])
    weights = sum({t.data_ptr(): t.nbytes for t in (*model.parameters(), *model.buffers())}.values())
    kv = sum(layer[:, :, :context].nbytes for layer in (*cache.k, *cache.v))
    bandwidth = data.nbytes / min(sums)
    return {"threads": threads, "step_s": min(steps), "step_median_s": sorted(steps)[STEPS // 2],
            "bandwidth_gb_s": bandwidth / 1e9, "weights_gb": weights / 1e9, "kv_cache_gb": kv / 1e9,
            "ceiling_step_s": (weights + kv) / bandwidth, "ops": [dict(zip(("op", "self_s", "calls"), op)) for op in ops]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path.home() / ".cache/qwen-vl-disagg/bench-3b-random",
                        help="checkpoint dir (default: benchmarks/model.py's random 3B shape; run it once to make it)")
    parser.add_argument("--context", type=int, default=1200, help="cached tokens the step attends to")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results/decode_step.json"))
    args = parser.parse_args()
    model = LanguageModel.from_pretrained(args.model, torch.bfloat16)
    with torch.inference_mode():
        rounds = [[measure(model, args.context, threads) for threads in args.threads] for _ in range(args.rounds)]
    runs = [min(same, key=lambda run: run["step_s"]) for same in zip(*rounds)]
    for run in runs:
        total = sum(op["self_s"] for op in run["ops"])
        print(f"{run['threads']} thread(s): step {run['step_s'] * 1e3:.0f} ms (median {run['step_median_s'] * 1e3:.0f}); "
              f"bandwidth {run['bandwidth_gb_s']:.1f} GB/s, weights {run['weights_gb']:.2f} GB + KV cache "
              f"{run['kv_cache_gb']:.3f} GB → ceiling {run['ceiling_step_s'] * 1e3:.0f} ms "
              f"({run['ceiling_step_s'] / run['step_s']:.0%} of it reached); profiled self CPU per step:")
        for op in run["ops"][:10]:
            print(f"  {op['op']:28}{op['self_s'] * 1e3:9.1f} ms {op['self_s'] / total:6.1%} {op['calls']:6d} calls")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": str(args.model), "context": args.context, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
