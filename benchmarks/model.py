"""Benchmarks our two halves against transformers' Qwen2_5_VLForConditionalGeneration on one 1280x720 image.

Rows: ViT seconds, prefill seconds, decode tokens/s, peak RSS and load seconds of each half; then our LLM half with
its decoder weights quantized at load (--quantization int8, int4) against our bfloat16. Every measurement of a
half runs in its own fresh subprocess (`--worker NAME`), so peak RSS is per half: ours copies only that half's
tensors into memory; transformers maps the whole checkpoint, and the pages of it that the half touches count.
Image preprocessing is not timed: the visual half gets random pixel values of the right shape, and the LLM half gets
random image embeddings, so it needs no ViT. Weights are random, in the real 3B shape (built once with transformers,
cached), unless --model names a checkpoint. The machine's memory bandwidth bounds decode: the report gives the
ceiling and how close each side gets. Other processes on the machine disturb the timings; the header says how many
cores they kept busy, and --rounds keeps each metric's best over interleaved runs.

--load-only measures only loading the LLM half, ours in bfloat16, int8 and int4 against transformers: seconds to
load, peak RSS right after, then the first token of a small prompt (where mapped weights are faulted in) and the peak
RSS after it.

--peers puts our LLM half in bfloat16, int8 and int4 beside llama.cpp's bf16, Q8_0 and Q4_K_M GGUF of the same
checkpoint, interleaved: prefill of the prompt's length from an empty cache, and decode at that depth (llama-bench
with -p N and with -d N -n 31; its prompt is text tokens, ours has the image embeddings spliced in, the same work for
the decoder). The tools come from `bash benchmarks/peers/llamacpp.sh` (--llama-cpp DIR); the GGUF files are made
once with its `convert` beside the random checkpoint.

    python -m benchmarks.model [--quick] [--rounds N] [--model DIR] [--grid T H W]
                               [--quantized-only | --load-only | --peers [--llama-cpp DIR]] [--out results/model.json]
"""

import argparse
import functools
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from common.config import load_config
from common.messages import SamplingParams
from llm_worker.engine import Engine
from llm_worker.inputs import prefill_inputs
from llm_worker.model import LanguageModel
from visual_worker.vision import VisionTransformer

IMAGE_PAD, VISION_START, VISION_END = 151655, 151652, 151653
# the chat template around one image, as the Qwen tokenizer encodes it
PROMPT_HEAD = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198]  # system, user
PROMPT_TAIL = [74785, 419, 2168, 13, 151645, 198, 151644, 77091, 198]  # "Describe this image." then assistant

DECODE_TOKENS = 32  # greedy, no EOS stop: the first comes out of prefill, the other 31 are timed as decode
WARMUP_GRID = (1, 8, 8)  # one small image warms up kernels and allocators before the timed run
FULL_GRID = (1, 52, 92)  # 1280x720 → smart_resize 1288x728 → 52x92 patches → 1196 visual tokens
QUICK_GRID = (1, 16, 28)

TEXT_3B = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
    num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
    bos_token_id=151643, eos_token_id=151645,
)
VISION_3B = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
    fullatt_block_indexes=[7, 15, 23, 31], window_size=112, patch_size=14, temporal_patch_size=2,
    spatial_merge_size=2, tokens_per_second=2,
)
QUICK_TEXT = {**TEXT_3B, "num_hidden_layers": 4}
QUICK_VISION = {**VISION_3B, "depth": 4, "fullatt_block_indexes": [1, 3]}

WORKERS = ("ours-visual", "transformers-visual", "ours-llm", "transformers-llm")
QUANTIZED_WORKERS = ("ours-llm-int8", "ours-llm-int4")  # our LLM half, compared with "ours-llm" (bfloat16)
LOAD_WORKERS = ("load-transformers-llm", "load-ours-llm", "load-ours-llm-int8", "load-ours-llm-int4")
GGUF_TYPES = ("bf16", "q8_0", "q4_k_m")  # llama.cpp's counterparts of our bfloat16, int8 and int4
PEER_WORKERS = tuple(f"llamacpp-{kind}" for kind in GGUF_TYPES)
GIB = 2**30


def prompt_ids(grid: tuple[int, int, int]) -> list[int]:
    t, h, w = grid
    return PROMPT_HEAD + [VISION_START] + [IMAGE_PAD] * (t * h * w // 4) + [VISION_END] + PROMPT_TAIL


def random_pixels(grid: tuple[int, int, int]) -> torch.Tensor:
    t, h, w = grid
    return torch.randn(t * h * w, 1176, generator=torch.Generator().manual_seed(0))  # float32, as preprocessing gives


def random_image_embeds(grid: tuple[int, int, int], hidden: int) -> torch.Tensor:
    t, h, w = grid
    g = torch.Generator().manual_seed(1)
    return torch.randn(t * h * w // 4, hidden, generator=g).to(torch.bfloat16)


def peak_rss_gib() -> float:
    """This process's RSS high-water mark. Not ru_maxrss: Linux carries that over from the parent across fork+exec."""
    status = Path("/proc/self/status").read_text()
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return kib * 1024 / GIB


def timed(fn):
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


# ---- the checkpoint ----


def ensure_checkpoint(model_dir: Path, quick: bool) -> Path:
    """Random bf16 weights in the 3B shape (or the --quick shape), written once by transformers' save_pretrained."""
    if (model_dir / "config.json").is_file():
        return model_dir
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text, vision = (QUICK_TEXT, QUICK_VISION) if quick else (TEXT_3B, VISION_3B)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)
    print(f"writing random weights to {model_dir} (once) ...", file=sys.stderr, flush=True)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)  # std 0.02 normal init
    partial = model_dir.with_name(model_dir.name + ".partial")
    model.save_pretrained(partial)
    partial.rename(model_dir)  # only a complete checkpoint is ever found by the check above
    os.sync()  # so that writing back gigabytes of dirty pages does not overlap the timings
    return model_dir


# ---- workers: each runs in its own process and prints one JSON line ----


def time_vit(embed, grid, repeats: int) -> dict:
    """Times `embed(pixels, grid)` (pixels float32 → image embeddings), best of `repeats` after one small warm-up."""
    embed(random_pixels(WARMUP_GRID), WARMUP_GRID)
    pixels = random_pixels(grid)
    seconds = min(timed(lambda: embed(pixels, grid))[0] for _ in range(repeats))
    return {"vit_s": seconds}


def ours_visual(model_dir, grid, repeats) -> dict:
    load_s, vit = timed(lambda: VisionTransformer.from_pretrained(model_dir, dtype=torch.bfloat16))
    return {"load_s": load_s, **time_vit(lambda pixels, g: vit.embed(pixels, [g]), grid, repeats)}


def transformers_visual(model_dir, grid, repeats) -> dict:
    model, load_s = load_transformers(model_dir)

    def embed(pixels, g):
        return model.model.visual(pixels.to(torch.bfloat16), grid_thw=torch.tensor([g])).pooler_output

    return {"load_s": load_s, **time_vit(embed, grid, repeats)}


def load_transformers(model_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    load_s, model = timed(lambda: Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16))
    return model.eval(), load_s


class OursGenerator:
    """Prefill = prompt embeddings with the image spliced in, M-RoPE ids, forward, first token; then engine steps."""

    def __init__(self, model_dir, quantization=None):
        self.config = load_config(model_dir)
        self.load_s, self.model = timed(
            lambda: LanguageModel.from_pretrained(model_dir, dtype=torch.bfloat16, quantization=quantization))

    def reset(self, prompt_tokens: int) -> None:
        """A fresh engine: a server allocates its KV cache once, so that is not part of a request's prefill."""
        self.engine = Engine(self.model, max_batch=1, max_len=prompt_tokens + DECODE_TOKENS)

    def prefill(self, ids, image_embeds, grid) -> int:
        embeds, positions, delta = prefill_inputs(self.model, self.config, ids, image_embeds, None, [grid])
        self.seq = self.engine.add(embeds, positions, delta, SamplingParams(max_new_tokens=DECODE_TOKENS), [])
        return self.seq.tokens[-1]

    def decode(self) -> int:
        self.engine.step()
        return self.seq.tokens[-1]

    def bytes_per_decode_step(self, context: float) -> dict:
        """Bytes a decode step must read: every weight once (the embedding table only as the tied lm_head; an untied
        one contributes a single row; quantized codes, scales and zeros are buffers), and the keys and values of
        `context` cached tokens in every layer."""
        tensors = (*self.model.parameters(), *self.model.buffers())
        storages = {t.data_ptr(): t.nbytes for t in tensors}  # a tied table is one storage, read once
        weights = sum(storages.values())
        if not self.config.text.tie_word_embeddings:
            weights -= self.model.model.embed_tokens.weight.nbytes
        text = self.config.text
        kv = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * context * self.model.dtype.itemsize
        return {"weights": weights, "kv_cache": kv}


class TransformersGenerator:
    """The same work through transformers' forward: input ids, the image embeddings as precomputed encoder outputs,
    a DynamicCache, logits of the last token only, greedy argmax."""

    def __init__(self, model_dir):
        self.model, self.load_s = load_transformers(model_dir)

    def reset(self, prompt_tokens: int) -> None:
        """Nothing to allocate ahead: transformers' DynamicCache grows inside the forward."""
        self.cache = None

    def prefill(self, ids, image_embeds, grid) -> int:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        input_ids = torch.tensor([ids])
        out = self.model(
            input_ids=input_ids, mm_token_type_ids=(input_ids == IMAGE_PAD).int(), image_grid_thw=torch.tensor([grid]),
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=(image_embeds,))},
            use_cache=True, logits_to_keep=1,
        )
        self.cache, self.token = out.cache, int(out.logits[0, -1].argmax())
        return self.token

    def decode(self) -> int:
        out = self.model(input_ids=torch.tensor([[self.token]]), cache=self.cache, use_cache=True)
        self.cache, self.token = out.cache, int(out.logits[0, -1].argmax())
        return self.token


def time_generation(generator, hidden: int, grid, repeats: int) -> dict:
    """Prefill best of `repeats` after one small warm-up; then DECODE_TOKENS - 1 decode steps timed together."""
    warmup_ids = prompt_ids(WARMUP_GRID)
    generator.reset(len(warmup_ids))
    generator.prefill(warmup_ids, random_image_embeds(WARMUP_GRID, hidden), WARMUP_GRID)
    generator.decode()
    ids, image_embeds = prompt_ids(grid), random_image_embeds(grid, hidden)
    prefill_s, tokens = float("inf"), []
    for _ in range(repeats):
        generator.reset(len(ids))
        seconds, first = timed(lambda: generator.prefill(ids, image_embeds, grid))
        prefill_s, tokens = min(prefill_s, seconds), [first]
    steps = DECODE_TOKENS - 1
    decode_s, rest = timed(lambda: [generator.decode() for _ in range(steps)])
    return {"prompt_tokens": len(ids), "prefill_s": prefill_s, "decode_tok_s": steps / decode_s, "tokens": tokens + rest}


def ours_llm(model_dir, grid, repeats, quantization=None) -> dict:
    generator = OursGenerator(model_dir, quantization)
    result = time_generation(generator, generator.config.text.hidden_size, grid, repeats)
    context = result["prompt_tokens"] + DECODE_TOKENS / 2  # the mean cache length over the decode steps
    return {"load_s": generator.load_s, **result, "decode_bytes": generator.bytes_per_decode_step(context)}


def transformers_llm(model_dir, grid, repeats) -> dict:
    generator = TransformersGenerator(model_dir)
    hidden = generator.model.config.text_config.hidden_size
    return {"load_s": generator.load_s, **time_generation(generator, hidden, grid, repeats)}


def load_and_first_token(generator, hidden: int) -> dict:
    """The generator's load seconds and the peak RSS right after; then the seconds to the first token of the warm-up
    prompt (memory-mapped weights are faulted in there, by either side)."""
    load_rss = peak_rss_gib()
    ids = prompt_ids(WARMUP_GRID)
    generator.reset(len(ids))
    first_s, _ = timed(lambda: generator.prefill(ids, random_image_embeds(WARMUP_GRID, hidden), WARMUP_GRID))
    return {"load_s": generator.load_s, "load_peak_rss_gib": load_rss, "first_token_s": first_s}


def load_ours(model_dir, _grid, _repeats, quantization=None) -> dict:
    generator = OursGenerator(model_dir, quantization)
    return load_and_first_token(generator, generator.config.text.hidden_size)


def load_theirs(model_dir, _grid, _repeats) -> dict:
    generator = TransformersGenerator(model_dir)
    return load_and_first_token(generator, generator.model.config.text_config.hidden_size)


def bandwidth_worker(_model_dir, _grid, _repeats) -> dict:
    """Read bandwidth: the sum of a 1 GiB float32 tensor, best of 5 after one warm-up pass."""
    data = torch.ones(GIB // 4)
    data.sum()
    seconds = min(timed(data.sum)[0] for _ in range(5))
    return {"bytes_per_s": data.nbytes / seconds}


def llamacpp_bench(tool: Path, gguf: Path, *flags: str) -> dict:
    """llama-bench's record of the one test it runs with `flags` (avg_ts: tokens/s, avg_ns, model_size: bytes of
    the weights), at our thread count, once after its warm-up."""
    threads = str(len(os.sched_getaffinity(0)))
    cmd = [str(tool), "-m", str(gguf), "-t", threads, "-r", "1", "-o", "json", *flags]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    (test,) = json.loads(done.stdout)
    return test


def llamacpp_worker(kind: str, model_dir, grid, _repeats) -> dict:
    """llama.cpp on the GGUF of `kind`: prefill of our prompt's length, decode of DECODE_TOKENS - 1 tokens at that
    depth; peak RSS is llama-bench's (the largest child's)."""
    tool, gguf = Path(os.environ["LLAMA_BENCH"]), Path(os.environ["LLAMA_GGUF_DIR"]) / f"{kind}.gguf"
    prompt = len(prompt_ids(grid))
    prefill = llamacpp_bench(tool, gguf, "-p", str(prompt), "-n", "0")
    decode = llamacpp_bench(tool, gguf, "-p", "0", "-n", str(DECODE_TOKENS - 1), "-d", str(prompt))
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / GIB
    return {"prompt_tokens": prompt, "prefill_s": prefill["avg_ns"] / 1e9, "decode_tok_s": decode["avg_ts"],
            "weights_bytes": decode["model_size"], "llamacpp_peak_rss_gib": child_rss}


WORKER_FUNCTIONS = {
    "ours-visual": ours_visual, "transformers-visual": transformers_visual,
    "ours-llm": ours_llm, "transformers-llm": transformers_llm, "bandwidth": bandwidth_worker,
    "ours-llm-int8": functools.partial(ours_llm, quantization="int8"),
    "ours-llm-int4": functools.partial(ours_llm, quantization="int4"),
    "load-transformers-llm": load_theirs, "load-ours-llm": load_ours,
    "load-ours-llm-int8": functools.partial(load_ours, quantization="int8"),
    "load-ours-llm-int4": functools.partial(load_ours, quantization="int4"),
    **{f"llamacpp-{kind}": functools.partial(llamacpp_worker, kind) for kind in GGUF_TYPES},
}


def run_worker(args) -> None:
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    with torch.inference_mode():
        result = WORKER_FUNCTIONS[args.worker](args.model, tuple(args.grid), args.repeats)
    result.update(peak_rss_gib=peak_rss_gib(), threads=torch.get_num_threads())
    print(json.dumps(result))


# ---- the parent: spawn workers, print the table, write JSON ----


def spawn(name: str, model_dir: Path, grid, repeats: int) -> dict:
    print(f"running {name} ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "benchmarks.model", "--worker", name, "--model", str(model_dir),
           "--grid", *map(str, grid), "--repeats", str(repeats)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    if done.returncode:
        raise SystemExit(f"worker {name} failed with exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


BEST = {"vit_s": min, "prefill_s": min, "decode_tok_s": max, "load_s": min, "peak_rss_gib": min, "bytes_per_s": max,
        "load_peak_rss_gib": min, "first_token_s": min}


def best_of(runs: list[dict]) -> dict:
    """Each metric's best over rounds: other processes on the machine can only make a run slower."""
    return {**runs[-1], **{key: pick(run[key] for run in runs) for key, pick in BEST.items() if key in runs[0]}}


def busy_cpu_seconds() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + t.steal


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_rounds(model_dir: Path, grid, repeats: int, rounds: int, workers) -> tuple[dict[str, list[dict]], float]:
    """Every worker `rounds` times, interleaved → each worker's runs, and the cores that other processes kept busy
    meanwhile on average (anything well above 0 means the timings are disturbed)."""
    runs = {name: [] for name in workers}
    busy, ours, start = busy_cpu_seconds(), children_cpu_seconds(), time.perf_counter()
    for _ in range(rounds):
        for name, name_runs in runs.items():
            name_runs.append(spawn(name, model_dir, grid, repeats))
    others = (busy_cpu_seconds() - busy) - (children_cpu_seconds() - ours)
    return runs, others / (time.perf_counter() - start)


def table_rows(results: dict) -> list[tuple[str, float, float, float]]:
    """(label, ours, transformers, ratio); every ratio is < 1 when ours is better."""
    ov, tv, ol, tl = (results[w] for w in WORKERS)
    prompt = ol["prompt_tokens"]
    return [
        ("ViT s", ov["vit_s"], tv["vit_s"], ov["vit_s"] / tv["vit_s"]),
        (f"prefill s ({prompt} tokens)", ol["prefill_s"], tl["prefill_s"], ol["prefill_s"] / tl["prefill_s"]),
        (f"decode tok/s ({DECODE_TOKENS - 1} steps)", ol["decode_tok_s"], tl["decode_tok_s"],
         tl["decode_tok_s"] / ol["decode_tok_s"]),
        ("peak RSS visual half GiB", ov["peak_rss_gib"], tv["peak_rss_gib"], ov["peak_rss_gib"] / tv["peak_rss_gib"]),
        ("peak RSS LLM half GiB", ol["peak_rss_gib"], tl["peak_rss_gib"], ol["peak_rss_gib"] / tl["peak_rss_gib"]),
        ("load s visual half", ov["load_s"], tv["load_s"], ov["load_s"] / tv["load_s"]),
        ("load s LLM half", ol["load_s"], tl["load_s"], ol["load_s"] / tl["load_s"]),
    ]


def decode_ceiling(result: dict, bandwidth: float) -> dict:
    """What one of our LLM runs reads per decode step, the tok/s that bandwidth allows for it, and how close it got."""
    step = result["decode_bytes"]
    ceiling = bandwidth / (step["weights"] + step["kv_cache"])
    return {"weights_gb": step["weights"] / 1e9, "kv_cache_gb": step["kv_cache"] / 1e9, "ceiling_tok_s": ceiling,
            "fraction": result["decode_tok_s"] / ceiling}


def bandwidth_ceiling(results: dict, bandwidth: float) -> dict:
    ours = decode_ceiling(results["ours-llm"], bandwidth)
    return {
        "bandwidth_gb_s": bandwidth / 1e9, "weights_gb": ours["weights_gb"], "kv_cache_gb": ours["kv_cache_gb"],
        "ceiling_tok_s": ours["ceiling_tok_s"], "ours_fraction": ours["fraction"],
        "transformers_fraction": results["transformers-llm"]["decode_tok_s"] / ours["ceiling_tok_s"],
    }


def quantized_rows(results: dict, bandwidth: float) -> list[tuple[str, float, float, float]]:
    """(label, bfloat16, int8, int4) for our LLM half: the timings, memory, and each decode's bandwidth ceiling."""
    runs = [results[name] for name in ("ours-llm", *QUANTIZED_WORKERS)]
    limits = [decode_ceiling(run, bandwidth) for run in runs]
    bf16 = runs[0]
    same = [sum(1 for _ in itertools.takewhile(lambda pair: pair[0] == pair[1], zip(bf16["tokens"], run["tokens"])))
            for run in runs]
    return [
        (f"decode tok/s ({DECODE_TOKENS - 1} steps)", *(run["decode_tok_s"] for run in runs)),
        ("decode speed-up over bfloat16", *(run["decode_tok_s"] / bf16["decode_tok_s"] for run in runs)),
        (f"prefill s ({bf16['prompt_tokens']} tokens)", *(run["prefill_s"] for run in runs)),
        ("load s LLM half", *(run["load_s"] for run in runs)),
        ("peak RSS LLM half GiB", *(run["peak_rss_gib"] for run in runs)),
        ("weights read per decode step GB", *(limit["weights_gb"] for limit in limits)),
        ("decode ceiling tok/s (bandwidth / bytes)", *(limit["ceiling_tok_s"] for limit in limits)),
        ("decode / its ceiling", *(limit["fraction"] for limit in limits)),
        (f"greedy tokens equal to bfloat16's (of {DECODE_TOKENS})", *same),
    ]


def load_rows(results: dict) -> list[tuple[str, float, float, float, float, float, float, float]]:
    """(label, transformers, ours bfloat16, int8, int4, and ours / transformers for each of ours)."""
    runs = [results[name] for name in LOAD_WORKERS]
    labels = {"load_s": "load s LLM half", "load_peak_rss_gib": "peak RSS after load GiB",
              "first_token_s": "first token s (warm-up prompt)", "peak_rss_gib": "peak RSS after it GiB"}
    return [(label, *(run[key] for run in runs), *(run[key] / runs[0][key] for run in runs[1:]))
            for key, label in labels.items()]


def peer_rows(results: dict, bandwidth: float) -> list[tuple]:
    """(label, then ours, llama.cpp and llama.cpp / ours for bfloat16 / bf16, int8 / Q8_0, int4 / Q4_K_M). llama.cpp's
    bytes a step are its weights (llama-bench's model_size; the tied token table is its output matrix, read once) plus
    the same KV cache."""
    pairs = [(results[ours], results[peer]) for ours, peer in zip(("ours-llm", *QUANTIZED_WORKERS), PEER_WORKERS)]

    def row(label, ours_value, peer_value, ratio):
        return (label, *itertools.chain.from_iterable(
            (ours_value(o), peer_value(p), ratio(ours_value(o), peer_value(p))) for o, p in pairs))

    def peer_ceiling(peer, ours):
        return bandwidth / (peer["weights_bytes"] + ours["decode_bytes"]["kv_cache"])

    prompt = pairs[0][0]["prompt_tokens"]
    lines = [
        row(f"decode tok/s ({DECODE_TOKENS - 1} steps at depth {prompt})", lambda o: o["decode_tok_s"],
            lambda p: p["decode_tok_s"], lambda a, b: a / b),
        row(f"prefill s ({prompt} tokens)", lambda o: o["prefill_s"], lambda p: p["prefill_s"], lambda a, b: b / a),
        row("weights read per decode step GB", lambda o: decode_ceiling(o, bandwidth)["weights_gb"],
            lambda p: p["weights_bytes"] / 1e9, lambda a, b: b / a),
        row("peak RSS GiB", lambda o: o["peak_rss_gib"], lambda p: p["llamacpp_peak_rss_gib"], lambda a, b: b / a),
    ]
    fractions = [(decode_ceiling(o, bandwidth)["fraction"], p["decode_tok_s"] / peer_ceiling(p, o)) for o, p in pairs]
    lines.append(("decode / its bandwidth ceiling",
                  *itertools.chain.from_iterable((ours, peer, ours / peer) for ours, peer in fractions)))
    return lines


def peer_report(rows) -> str:
    heads = ("ours bf16", "llama bf16", "ratio", "ours int8", "Q8_0", "ratio", "ours int4", "Q4_K_M", "ratio")
    lines = [f"{'':42}" + "".join(f"{head:>11}" for head in heads)]
    lines += [f"{label:42}" + "".join(f"{value:11.3f}" for value in values) for label, *values in rows]
    lines.append("ratio: ours / llama.cpp for tok/s and the fraction of the ceiling, llama.cpp / ours for seconds, "
                 "bytes and GiB (> 1: ours is better)")
    return "\n".join(lines)


def load_report(rows) -> str:
    lines = [f"{'':34}{'transformers':>13}{'ours bf16':>10}{'int8':>8}{'int4':>8}   ours / transformers",
             *(f"{label:34}{theirs:13.3f}{bf16:10.3f}{int8:8.3f}{int4:8.3f}   "
               + " / ".join(f"{ratio:.2f}" for ratio in ratios) for label, theirs, bf16, int8, int4, *ratios in rows)]
    return "\n".join(lines)


def quantized_report(rows) -> str:
    lines = [f"our LLM half, decoder weights quantized at load (--quantization):",
             f"{'':44}{'bfloat16':>10}{'int8':>10}{'int4':>10}"]
    lines += [f"{label:44}" + "".join(f"{value:10.3f}" for value in values) for label, *values in rows]
    return "\n".join(lines)


def report(header: str, rows, limit: dict) -> str:
    lines = [header, f"{'':34}{'ours':>10}{'transformers':>14}{'ratio':>8}"]
    lines += [f"{label:34}{ours:10.3f}{theirs:14.3f}{ratio:8.2f}" for label, ours, theirs, ratio in rows]
    lines += [
        "ratio: ours/transformers for seconds and GiB, transformers/ours for tok/s (< 1: ours is better)",
        f"memory read bandwidth (sum over 1 GiB, best of 5): {limit['bandwidth_gb_s']:.1f} GB/s",
        f"decode reads per step: weights {limit['weights_gb']:.3f} GB + KV cache {limit['kv_cache_gb']:.3f} GB"
        f" → ceiling {limit['ceiling_tok_s']:.2f} tok/s; ours reaches {limit['ours_fraction']:.0%},"
        f" transformers {limit['transformers_fraction']:.0%}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint dir (default: random weights, created once in --cache)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/qwen-vl-disagg",
                        help="where the random checkpoints live")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 text and 4 vision layers, a small image")
    parser.add_argument("--repeats", type=int, default=1, help="timed ViT and prefill runs per side (best is kept)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of every worker, interleaved (best is kept)")
    parser.add_argument("--grid", type=int, nargs=3, metavar=("T", "H", "W"),
                        help=f"the image's patch grid (default {FULL_GRID}: 1280x720; --quick {QUICK_GRID})")
    parser.add_argument("--quantized-only", action="store_true",
                        help="only our LLM half in bfloat16, int8 and int4 (no ViT, no transformers)")
    parser.add_argument("--load-only", action="store_true",
                        help="only loading the LLM half: ours in bfloat16, int8 and int4 against transformers")
    parser.add_argument("--peers", action="store_true",
                        help="our LLM half in bfloat16, int8, int4 beside llama.cpp's bf16, Q8_0, Q4_K_M GGUF")
    parser.add_argument("--llama-cpp", type=Path, default=Path(os.environ.get("LLAMA_CPP_DIR", "/work/peers/llamacpp")),
                        help="where benchmarks/peers/llamacpp.sh built llama.cpp (default $LLAMA_CPP_DIR, else "
                             "/work/peers/llamacpp)")
    parser.add_argument("--out", type=Path,
                        help="default results/model.json (--load-only: results/model_load.json, --peers: "
                             "results/model_peers.json)")
    parser.add_argument("--worker", choices=sorted(WORKER_FUNCTIONS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(args)

    grid = tuple(args.grid) if args.grid else QUICK_GRID if args.quick else FULL_GRID
    model_dir = args.model or ensure_checkpoint(args.cache / ("bench-quick-random" if args.quick else "bench-3b-random"),
                                                args.quick)
    out = args.out or Path("results/model_load.json" if args.load_only else
                           "results/model_peers.json" if args.peers else "results/model.json")
    if args.load_only:
        workers = LOAD_WORKERS
    elif args.peers:
        workers = (*itertools.chain.from_iterable(zip(("ours-llm", *QUANTIZED_WORKERS), PEER_WORKERS)), "bandwidth")
        os.environ.update(LLAMA_BENCH=str(args.llama_cpp / "build/bin/llama-bench"),
                          LLAMA_GGUF_DIR=str(ensure_gguf(model_dir, args.llama_cpp)))
    elif args.quantized_only:
        workers = ("ours-llm", *QUANTIZED_WORKERS, "bandwidth")
    else:
        workers = (*WORKERS, *QUANTIZED_WORKERS, "bandwidth")
    runs, other_cores = run_rounds(model_dir, grid, args.repeats, args.rounds, workers)
    results = {name: best_of(name_runs) for name, name_runs in runs.items()}
    text = load_config(model_dir).text
    t, h, w = grid
    header = (
        f"{model_dir} ({text.num_hidden_layers} text layers, hidden {text.hidden_size}), bfloat16, "
        f"{results[workers[0]]['threads']} threads, best of {args.rounds} round(s); other processes kept "
        f"{other_cores:.2f} cores busy meanwhile"
    )
    record = {"model": str(model_dir), "grid": grid, "other_processes_cores": other_cores, "runs": runs}
    if args.load_only:
        rows = load_rows(results)
        print(f"{header}\nloading the LLM half, each in a fresh process\n{load_report(rows)}")
        keys = ("row", "transformers", "bfloat16", "int8", "int4", "bfloat16 / transformers", "int8 / transformers",
                "int4 / transformers")
        record["load_rows"] = [dict(zip(keys, row)) for row in rows]
        return write_record(record, out)
    bandwidth = results["bandwidth"]["bytes_per_s"]
    if args.peers:
        rows = peer_rows(results, bandwidth)
        print(f"{header}\nagainst llama.cpp, same checkpoint\n{peer_report(rows)}")
        print(f"memory read bandwidth (sum over 1 GiB, best of 5): {bandwidth / 1e9:.1f} GB/s")
        keys = ("row", *itertools.chain.from_iterable((f"ours {a}", f"llama.cpp {b}", f"{a} ratio")
                                                      for a, b in zip(("bfloat16", "int8", "int4"), GGUF_TYPES)))
        record["peer_rows"] = [dict(zip(keys, row)) for row in rows]
        return write_record(record, out)
    header += (f"\nimage grid {grid}: {t * h * w} patches, {t * h * w // 4} visual tokens (preprocessing not timed); "
               f"greedy {DECODE_TOKENS} tokens, no EOS stop")
    if args.quantized_only:
        print(header)
    else:
        limit = bandwidth_ceiling(results, bandwidth)
        rows = table_rows(results)
        same = results["ours-llm"]["tokens"] == results["transformers-llm"]["tokens"]
        print(report(f"{header}; same greedy tokens: {same}", rows, limit))
        record.update(rows=[dict(zip(("row", "ours", "transformers", "ratio"), r)) for r in rows], decode_limit=limit)
    quantized = quantized_rows(results, bandwidth)
    print(quantized_report(quantized))
    print(f"memory read bandwidth (sum over 1 GiB, best of 5): {bandwidth / 1e9:.1f} GB/s")
    record["quantized_rows"] = [dict(zip(("row", "bfloat16", "int8", "int4"), r)) for r in quantized]
    write_record(record, out)


def ensure_gguf(model_dir: Path, llama_cpp: Path) -> Path:
    """The bf16, Q8_0 and Q4_K_M GGUF files of the checkpoint, made once by `llamacpp.sh convert` beside it."""
    out = model_dir.with_name(model_dir.name + "-gguf")
    if not all((out / f"{kind}.gguf").is_file() for kind in GGUF_TYPES):
        script = Path(__file__).resolve().parent / "peers/llamacpp.sh"
        subprocess.run(["bash", str(script), "convert", str(model_dir), str(out)], check=True,
                       env={**os.environ, "LLAMA_CPP_DIR": str(llama_cpp)})
    return out


def write_record(record: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
