"""Benchmarks the visual backends on one 1280x720 image (grid 1 x 52 x 92: 4784 patches, the 5120-patch bucket):
the eager ViT (the checkpoint's bfloat16, and float32) against the TVM-compiled one with its built-in CPU schedules
(no tuning) and, with --tune-trials, MetaSchedule-tuned on top (its compile seconds include the tuning; the
database starts empty in each run), with compile and load seconds. The compiled ViT computes in float32
(visual_worker/tvm_backend.py: COMPUTE_DTYPES). Models: the demo model's ViT (examples/model) and the 3B-shape ViT
with random weights (the checkpoint benchmarks/model.py builds and caches). Rows run interleaved, best of --rounds,
in one process; the header says how many cores other processes kept busy meanwhile.

    python -m benchmarks.visual_backends [--models demo,3b] [--tune-trials 0] [--rounds 2]
        [--out results/visual_backends.json]
"""

import argparse
import json
import shutil
import time
from pathlib import Path

import psutil
import torch

from benchmarks.model import FULL_GRID, ensure_checkpoint, random_pixels, timed
from common.options import DEFAULT_MODEL
from visual_worker.tvm_backend import ArtifactCache, TvmVisionBackend, compute_copy
from visual_worker.vision import VisionTransformer

BUCKET = 5120


def model_dirs(cache: Path) -> dict[str, Path]:
    return {"demo": DEFAULT_MODEL, "3b": cache / "bench-3b-random"}


def prepare(name: str, model_dir: Path, cache: Path, tune_trials: int) -> tuple[dict, dict]:
    """→ ({row: embed function}, {row: {compile_s, load_s}}) for one model."""
    if name == "3b":
        ensure_checkpoint(model_dir, quick=False)
    load_s, vit = timed(lambda: VisionTransformer.from_pretrained(model_dir, dtype=torch.bfloat16))
    vit32 = compute_copy(vit)
    rows = {"eager bfloat16": vit.embed, "eager float32": vit32.embed}
    costs = {"eager bfloat16": {"load_s": load_s}, "eager float32": {}}
    builds = {"tvm scheduled": 0} | ({f"tvm tuned ({tune_trials} trials)": tune_trials} if tune_trials else {})
    for row, trials in builds.items():
        artifacts = ArtifactCache(cache / "tvm-bench" / ("tuned" if trials else "scheduled"))
        shutil.rmtree(artifacts.root / "tuning", ignore_errors=True)  # the budget is this run's, not a sum of runs
        compile_s, _ = timed(lambda: artifacts.compile(vit32, BUCKET, "llvm", trials))
        load_s, backend = timed(lambda: TvmVisionBackend(vit32, [BUCKET], cache=artifacts))
        rows[row] = backend.embed
        costs[row] = {"compile_s": compile_s, "load_s": load_s}
    return rows, costs


def other_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy, less this process's own."""
    machine, mine = psutil.cpu_times(), psutil.Process().cpu_times()
    return machine.user + machine.system - mine.user - mine.system


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="demo,3b", help="comma-separated: demo, 3b")
    p.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trial budget for the tuned row (0: none)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache/qwen-vl-disagg")
    p.add_argument("--out", type=Path, default=Path("results/visual_backends.json"))
    args = p.parse_args()
    pixels = random_pixels(FULL_GRID)
    report = {"grid": FULL_GRID, "bucket": BUCKET, "tune_trials": args.tune_trials, "rounds": args.rounds,
              "threads": torch.get_num_threads(), "models": {}}
    for name in args.models.split(","):
        rows, costs = prepare(name, model_dirs(args.cache)[name], args.cache, args.tune_trials)
        expected = rows["eager float32"](pixels, [FULL_GRID])
        times = {row: [] for row in rows}
        start, others = time.monotonic(), other_cpu_seconds()
        for _ in range(args.rounds):
            for row, embed in rows.items():
                seconds, out = timed(lambda: embed(pixels, [FULL_GRID]))
                times[row].append(seconds)
                costs[row]["max_abs_diff_vs_eager_float32"] = float((out.float() - expected).abs().max())
        busy = (other_cpu_seconds() - others) / (time.monotonic() - start)
        bf16, f32 = min(times["eager bfloat16"]), min(times["eager float32"])
        report["models"][name] = {
            "busy_cores_other_processes": busy, "max_abs_eager_float32": float(expected.abs().max()), "rows": {
            row: {"vit_s": min(t), "all_s": t, "ratio_to_eager_bfloat16": min(t) / bf16,
                  "ratio_to_eager_float32": min(t) / f32, **costs[row]}
            for row, t in times.items()}}
        print(f"\n{name} ViT, grid {FULL_GRID} in the {BUCKET}-patch bucket, best of {args.rounds}; other processes "
              f"busy {busy:.2f} cores; largest |eager float32 output| {expected.abs().max():.1f}")
        print("| backend | ViT s | / eager bf16 | / eager f32 | compile s | load s | max abs diff vs eager f32 |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for row, r in report["models"][name]["rows"].items():
            print(f"| {row} | {r['vit_s']:.2f} | {r['ratio_to_eager_bfloat16']:.2f} | "
                  f"{r['ratio_to_eager_float32']:.2f} | {r.get('compile_s', float('nan')):.1f} | "
                  f"{r.get('load_s', float('nan')):.2f} | "
                  f"{r['max_abs_diff_vs_eager_float32']:.1e} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
