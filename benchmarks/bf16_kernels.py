"""Our two halves in bfloat16 with common/kernels.py's BF16Linear (what the workers run on an x86 CPU with AVX2)
against the same models with plain nn.Linear (PyTorch's bfloat16 kernels, which transformers runs too), interleaved in one
process on the random 3B-shape checkpoint of benchmarks/model.py: the ViT on one 1280x720 image (4784 patches), a
prefill, and a decode step at a long context, beside the read bandwidth of a float32 sum (the decode ceiling).

    python -m benchmarks.bf16_kernels [--prefill 256] [--context 1200] [--rounds 1] [--out results/bf16_kernels.json]
"""

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.model import FULL_GRID, ensure_checkpoint, random_pixels
from common import kernels
from llm_worker.model import LanguageModel
from visual_worker.vision import VisionTransformer


def use_kernels(model: nn.Module, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.weight.dtype == torch.bfloat16:
            m.__class__ = kernels.BF16Linear if on else nn.Linear


def best(f, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "qwen-vl-disagg")
    p.add_argument("--prefill", type=int, default=256)
    p.add_argument("--context", type=int, default=1200)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("results/bf16_kernels.json"))
    args = p.parse_args()
    if kernels.isa() is None:
        raise SystemExit("this CPU has no AVX2 and FMA (or this machine no gcc): BF16Linear is not used here")
    model_dir = ensure_checkpoint(args.cache / "bench-3b-random", quick=False)
    vit = VisionTransformer.from_pretrained(model_dir, torch.bfloat16)
    llm = LanguageModel.from_pretrained(model_dir, torch.bfloat16)
    pixels = random_pixels(FULL_GRID)
    C = llm.config.hidden_size
    cache = llm.new_cache(1, args.context + 1)
    prompt = torch.randn(1, args.prefill, C, dtype=torch.bfloat16)
    positions = torch.arange(args.prefill).expand(3, 1, -1)
    step_x = torch.randn(1, 1, C, dtype=torch.bfloat16)
    step_at = torch.full((3, 1, 1), args.context)
    work = {
        "ViT s (4784 patches)": lambda: vit.embed(pixels, [FULL_GRID]),
        f"prefill s ({args.prefill} tokens)": lambda: llm(prompt, positions, torch.arange(args.prefill)[None], cache,
                                                          torch.tensor([args.prefill - 1])),
        f"decode step s ({args.context} cached)": lambda: llm(step_x, step_at, torch.tensor([[args.context]]), cache,
                                                              torch.tensor([0])),
    }
    big = torch.randn(2**28 // 4 * 4)  # 1 GiB
    results = {name: {} for name in work}
    step = list(work)[-1]
    for on in (True, False):  # builds the kernel and faults in the mapped weights the decode step reads
        use_kernels(llm, on)
        work[step]()
    for _ in range(args.rounds):  # interleaved: each piece of work with BF16Linear, then with nn.Linear
        for name, f in work.items():
            for on, label in ((True, "BF16Linear"), (False, "nn.Linear")):
                use_kernels(vit, on)
                use_kernels(llm, on)
                t = best(f, 3 if name == step else 1)
                results[name][label] = min(t, results[name].get(label, float("inf")))
    bandwidth = big.numel() * 4 / best(big.sum, 3)
    weight_bytes = sum(t.numel() * t.element_size() for t in llm.parameters())
    ceiling = weight_bytes / bandwidth
    print(f"{model_dir}, bfloat16, {torch.get_num_threads()} threads, best of {args.rounds} interleaved rounds; "
          f"decode kernel {kernels.isa()}, oneDNN bfloat16 units: {kernels.bf16_units()}")
    print(f"{'':32} {'BF16Linear':>11} {'nn.Linear':>11} {'speed-up':>9}")
    for name, r in results.items():
        print(f"{name:32} {r['BF16Linear']:11.3f} {r['nn.Linear']:11.3f} {r['nn.Linear'] / r['BF16Linear']:8.2f}x")
    step = results[step]
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s: a step reads {weight_bytes / 2**30:.2f} GiB of weights, "
          f"ceiling {ceiling:.3f} s; BF16Linear at {ceiling / step['BF16Linear']:.0%} of it, nn.Linear at "
          f"{ceiling / step['nn.Linear']:.0%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "bandwidth_bytes_per_s": bandwidth,
                                    "weight_bytes": weight_bytes, "threads": torch.get_num_threads()}, indent=2))


if __name__ == "__main__":
    main()
