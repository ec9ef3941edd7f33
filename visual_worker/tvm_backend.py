"""The compiled visual backend (`--visual-backend tvm`): the ViT exported with torch.export for fixed patch buckets,
compiled by TVM, cached on disk, and run with the checkpoint's weights passed in as inputs.

A request's patches go through the smallest bucket that holds them, padded as `make_layout(pad_to=bucket)` pads
them; rotary cos/sin, the window permutation and the attention groups stay host-computed inputs. The compiled graph
replaces the eager ViT's one attention call per group length (its shapes depend on the images) with two fixed-shape
forms that give the same numbers: window attention over fixed blocks of the window-ordered sequence, each query
block against itself and its two neighbours, masked to its own window (a window is contiguous and at most one block
long, so it never reaches further); full attention over the whole bucket, masked to the token's own image or frame.
"""

import argparse
import copy
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.config import DTYPES, VisionConfig
from common.layers import rotate_half
from common.options import Options, parse_patch_buckets
from visual_worker.vision import Segments, VisionTransformer, make_layout

DEFAULT_CACHE = Path.home() / ".cache" / "qwen-vl-disagg" / "tvm"
CACHE_ENV = "QWEN_VL_TVM_CACHE"  # overrides DEFAULT_CACHE
SOURCES = [Path(__file__), Path(__file__).with_name("vision.py")]  # the code that decides the compiled graph
TARGETS = ("llvm", "cuda")
# the dtype the compiled graph computes in, by the checkpoint's: TVM 0.27's PyTorch importer refuses bfloat16 linear
# layers (it adds their float32 product to a bfloat16 bias), so bfloat16 runs in float32 and is cast back
COMPUTE_DTYPES = {torch.float32: torch.float32, torch.float16: torch.float16, torch.bfloat16: torch.float32}


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE))


def choose_bucket(buckets: list[int], num_patches: int) -> int:
    """The smallest bucket that holds num_patches; a ValueError (a 400 for the request) when none does."""
    for bucket in buckets:
        if num_patches <= bucket:
            return bucket
    raise ValueError(f"the images (or the video) of this request come to {num_patches} patches, more than the largest "
                     f"patch bucket, {buckets[-1]} (--patch-buckets {','.join(map(str, buckets))}): send fewer or "
                     "smaller images, or a lower max_pixels")


# ---------------------------------------------------------------------------------------------------------------
# The fixed-shape graph


def window_block(config: VisionConfig) -> int:
    """Patches in one full attention window (8 x 8 = 64 for 112-px windows): the block of the banded attention."""
    side = config.window_size // config.patch_size // config.spatial_merge_size * config.spatial_merge_size
    return side * side


def segment_ids(segments: Segments, n: int) -> Tensor:
    """(n,) int64: the group of each sequence position (groups numbered in the order of segments.gathers)."""
    ids = torch.empty(n, dtype=torch.int64)
    start = 0
    for gather in segments.gathers:  # (B_g, L_g)
        ids[gather] = torch.arange(start, start + gather.shape[0])[:, None]
        start += gather.shape[0]
    return ids


@dataclass
class BucketInputs:
    """Host-side inputs of one compiled call, every shape fixed by the bucket N."""

    pixels: Tensor  # (N, 1176), padded with zero patches
    cos: Tensor  # (N, head_dim) float32, window order
    sin: Tensor  # (N, head_dim)
    merged_order: Tensor  # (N / 4,) int64: merged token (image order) at each window-order position
    restore: Tensor  # (N / 4,) int64: window-order position of each merged token (the inverse permutation)
    window_ids: Tensor  # (N,) int64: the attention window of each patch, window order
    image_ids: Tensor  # (N,) int64: its image or video frame (padding: a group of its own)
    num_patches: int  # real patches

    def tensors(self) -> tuple[Tensor, ...]:
        return self.pixels, self.cos, self.sin, self.merged_order, self.restore, self.window_ids, self.image_ids


def bucket_inputs(config: VisionConfig, pixels: Tensor, grid: list[tuple[int, int, int]], bucket: int) -> BucketInputs:
    layout = make_layout(config, grid, pad_to=bucket)
    window_ids = segment_ids(layout.windows, bucket)
    real_windows = torch.bincount(window_ids[: layout.num_patches])
    if real_windows.max() > window_block(config):  # the banded attention would miss keys (make_layout never does it)
        raise ValueError(f"a window of {int(real_windows.max())} patches is longer than the "
                         f"{window_block(config)}-patch block the compiled attention assumes")
    return BucketInputs(
        F.pad(pixels, (0, 0, 0, bucket - pixels.shape[0])), layout.cos, layout.sin, layout.merged_order,
        torch.argsort(layout.merged_order), window_ids, segment_ids(layout.images, bucket), layout.num_patches,
    )


def masked_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
    """q (..., Lq, hs), k and v (..., Lk, hs), allowed (..., Lq, Lk) bool; every query allows at least itself."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~allowed, float("-inf")).float().softmax(-1).to(q.dtype)
    return scores @ v


def banded_window_attention(q: Tensor, k: Tensor, v: Tensor, ids: Tensor, block: int) -> Tensor:
    """q, k, v (N, nh, hs) in window order, ids (N,) → (N, nh, hs): each token attends within its window."""
    N, nh, hs = q.shape
    nb = -(-N // block)
    pad = nb * block - N
    # positions past N: a group of their own (-2); the band's edges beyond the sequence: nobody's (-1)
    q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
    ids = F.pad(ids, (0, pad), value=-2)
    kp, vp = (F.pad(t, (0, 0, 0, 0, block, block)) for t in (k, v))  # (nb * block + 2 * block, nh, hs)
    idp = F.pad(ids, (block, block), value=-1)
    span = nb * block
    band = lambda t: torch.cat([t[i * block: i * block + span].view(nb, block, *t.shape[1:]) for i in range(3)], 1)
    kb, vb = (band(t).transpose(1, 2) for t in (kp, vp))  # (nb, nh, 3 * block, hs): blocks b-1, b, b+1
    qb = q.view(nb, block, nh, hs).transpose(1, 2)  # (nb, nh, block, hs)
    allowed = ids.view(nb, block, 1) == band(idp)[:, None, :]  # (nb, block, 3 * block)
    out = masked_attention(qb, kb, vb, allowed[:, None])  # (nb, nh, block, hs)
    return out.transpose(1, 2).reshape(nb * block, nh, hs)[:N]


def full_attention(q: Tensor, k: Tensor, v: Tensor, ids: Tensor) -> Tensor:
    """q, k, v (N, nh, hs), ids (N,) → (N, nh, hs): each token attends to its own image or frame."""
    allowed = ids[:, None] == ids[None, :]  # (N, N)
    return masked_attention(*(t.transpose(0, 1) for t in (q, k, v)), allowed).transpose(0, 1)


class BucketGraph(nn.Module):
    """The ViT's forward at one fixed patch bucket, in the form torch.export and TVM take: the eager ViT's own weights
    (shared, not copied), the attention groups as segment ids instead of gathers by group length."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.vit = vit
        self.block = window_block(vit.config)

    def forward(self, pixels, cos, sin, merged_order, restore, window_ids, image_ids) -> Tensor:
        """BucketInputs.tensors() → image_embeds (N / 4, out_hidden) in image order, padding rows last."""
        vit, config = self.vit, self.vit.config
        unit = config.spatial_merge_size**2
        x = vit.patch_embed(pixels)  # (N, C)
        N, C = x.shape
        x = x.view(N // unit, unit * C)[merged_order].view(N, C)  # window order
        cos, sin = cos[:, None, :], sin[:, None, :]
        for i, block in enumerate(vit.blocks):
            attn = block.attn
            q, k, v = attn.qkv(block.norm1(x)).view(N, 3, attn.num_heads, -1).unbind(1)  # (N, nh, hs) each
            q = (q.float() * cos + rotate_half(q.float()) * sin).to(x.dtype)
            k = (k.float() * cos + rotate_half(k.float()) * sin).to(x.dtype)
            if i in config.fullatt_block_indexes:
                out = full_attention(q, k, v, image_ids)
            else:
                out = banded_window_attention(q, k, v, window_ids, self.block)
            x = x + attn.proj(out.reshape(N, C))
            x = x + block.mlp(block.norm2(x))
        return vit.merger(x)[restore]  # (N / 4, out_hidden)


# ---------------------------------------------------------------------------------------------------------------
# Export, compile, cache


def make_target(kind: str):
    """The TVM target for 'llvm' (this host's CPU) or 'cuda'. TVM 0.27 takes targets as dicts only."""
    import tvm
    from tvm.target import codegen

    if kind == "llvm":
        return tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": os.cpu_count()})
    if kind == "cuda":
        return tvm.target.Target({"kind": "cuda", "arch": os.environ.get("QWEN_VL_CUDA_ARCH", "sm_80")})
    raise ValueError(f"TVM target must be one of {', '.join(TARGETS)}, got {kind!r}")


def target_for_device(device: str) -> str:
    return "cuda" if str(device).startswith("cuda") else "llvm"


def cache_key(config: VisionConfig, bucket: int, dtype: torch.dtype, target) -> dict:
    """Everything that changes the compiled code. The weights are inputs, so one artifact serves every checkpoint
    of this vision shape."""
    import tvm

    sources = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:16]
    key = {"vision": asdict(config), "bucket": bucket, "dtype": str(dtype).removeprefix("torch."),
           "target": str(target), "tvm": tvm.__version__, "torch": torch.__version__, "sources": sources}
    return json.loads(json.dumps(key))  # as it reads back from the artifact's .json (tuples become lists)


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def example_inputs(vit: VisionTransformer, bucket: int) -> BucketInputs:
    """Inputs of the right shapes for tracing: one image of 2 x (bucket / 2) patches (any layout would do)."""
    pixels = torch.zeros(bucket, vit.config.patch_dim, dtype=vit.patch_embed.proj.weight.dtype)
    return bucket_inputs(vit.config, pixels, [(1, 2, bucket // 2)], bucket)


def export_graph(vit: VisionTransformer, bucket: int):
    """→ (TVM IRModule whose main takes the inputs and then the weights, the weights' names in that order)."""
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    graph = BucketGraph(vit).eval()
    with torch.no_grad():
        program = torch.export.export(graph, example_inputs(vit, bucket).tensors())
    names = list(program.graph_signature.parameters)
    mod = from_exported_program(program, keep_params_as_input=True, unwrap_unit_return_tuple=True)
    mod, _ = relax.frontend.detach_params(mod)  # the values come from the checkpoint at run time
    return clip_gathers(mod), names


def clip_gathers(mod):
    """The module with every gather (`take`) in clip mode: the importer emits fast mode, which reads out of bounds on
    a bad index, and MetaSchedule measures each kernel on random inputs (tuning crashed on it). Clipping costs two
    comparisons an index."""
    import tvm
    from tvm import relax

    take = tvm.ir.Op.get("relax.take")

    @relax.expr_functor.mutator
    class ClipTake(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op == take:
                return relax.op.take(call.args[0], call.args[1], call.attrs.axis, "clip")
            return call

    return tvm.IRModule({"main": ClipTake(mod).visit_expr(mod["main"])})


def build(mod, target, tune_trials: int, tuning_dir: Path):
    """IRModule → executable. With tune_trials > 0, MetaSchedule tunes first and adds to the database in tuning_dir;
    an existing database there is applied either way. GPU targets get TVM's dlight schedules by default."""
    import tvm
    from tvm import relax

    if target.kind.name == "llvm" and (tune_trials > 0 or (tuning_dir / "database_workload.json").exists()):
        tuning_dir.mkdir(parents=True, exist_ok=True)
        mod = relax.get_pipeline("static_shape_tuning", total_trials=tune_trials, target=target,
                                 work_dir=str(tuning_dir))(mod)
    return tvm.compile(mod, target=target)


@dataclass
class Compiled:
    """One loaded artifact: its VM's main function and the weight names it takes, in order."""

    main: object
    weight_names: list[str]
    compiled_s: float | None  # seconds spent compiling now; None when it was loaded from the cache
    load_s: float


class ArtifactCache:
    """Compiled ViTs on disk: <root>/<digest>.so with <digest>.json (its key and weight names) beside it, MetaSchedule
    databases in <root>/tuning/<digest>/. `compiles` counts the compilations this object has done."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else cache_root()
        self.compiles = 0

    def paths(self, key: dict) -> tuple[Path, Path, Path]:
        digest = key_digest(key)
        return self.root / f"{digest}.so", self.root / f"{digest}.json", self.root / "tuning" / digest

    def compile(self, vit: VisionTransformer, bucket: int, target_kind: str, tune_trials: int = 0,
                progress=None) -> Path:
        """Compiles one bucket and writes it to the cache (replacing what was there) → the artifact's path."""
        target = make_target(target_kind)
        key = cache_key(vit.config, bucket, vit.patch_embed.proj.weight.dtype, target)
        library, meta, tuning = self.paths(key)
        say = progress or (lambda stage: None)
        say("export")
        mod, names = export_graph(vit, bucket)
        say("tune" if tune_trials else "compile")
        executable = build(mod, target, tune_trials, tuning)
        self.root.mkdir(parents=True, exist_ok=True)
        partial = library.with_suffix(f".{os.getpid()}.so")  # another process never sees half a library
        executable.export_library(str(partial))
        partial.replace(library)
        meta.write_text(json.dumps({"key": key, "weights": names, "tune_trials": tune_trials}, indent=1))
        self.compiles += 1
        return library

    def load(self, vit: VisionTransformer, bucket: int, target_kind: str, device) -> Compiled:
        """The bucket's artifact from the cache, compiled now (and said so on stderr) when the cache lacks it."""
        import tvm
        from tvm import relax

        key = cache_key(vit.config, bucket, vit.patch_embed.proj.weight.dtype, make_target(target_kind))
        library, meta, _ = self.paths(key)
        compiled_s = None
        if not library.exists() or not meta.exists() or json.loads(meta.read_text())["key"] != key:
            print(f"visual worker: compiling the ViT for the {bucket}-patch bucket ({target_kind}), not in the cache "
                  f"{self.root}; `launch.py compile` does it ahead of time", file=sys.stderr)
            t0 = time.perf_counter()
            self.compile(vit, bucket, target_kind)
            compiled_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), device)
        return Compiled(vm["main"], json.loads(meta.read_text())["weights"], compiled_s, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------------------
# The backend the worker calls


def compute_copy(vit: VisionTransformer) -> VisionTransformer:
    """The ViT in its compute dtype (COMPUTE_DTYPES): itself, or a converted copy."""
    dtype = COMPUTE_DTYPES[vit.patch_embed.proj.weight.dtype]
    return vit if dtype == vit.patch_embed.proj.weight.dtype else copy.deepcopy(vit).to(dtype)


def tvm_device(device: str):
    import tvm

    if str(device).startswith("cuda"):
        return tvm.cuda(int(str(device).partition(":")[2] or 0))
    return tvm.cpu(0)


class TvmVisionBackend:
    """`embed(pixels, grid_thw)` as VisionTransformer.embed gives it, through the compiled bucket artifacts.
    Every bucket is loaded (or compiled) at start; the weights are the eager ViT's tensors, shared via DLPack."""

    def __init__(self, vit: VisionTransformer, buckets: list[int], device: str = "cpu",
                 cache: ArtifactCache | None = None):
        import tvm

        self.dtype = vit.patch_embed.proj.weight.dtype  # what the embeddings leave as
        self.vit = compute_copy(vit)
        self.buckets = sorted(buckets)
        self.cache = cache or ArtifactCache()
        self.device = tvm_device(device)
        self.compiled = {b: self.cache.load(self.vit, b, target_for_device(device), self.device) for b in self.buckets}
        params = dict(BucketGraph(self.vit).named_parameters())
        self.weights = {b: [tvm.runtime.from_dlpack(params[name].detach()) for name in c.weight_names]
                        for b, c in self.compiled.items()}

    def embed(self, pixels: Tensor, grid_thw) -> Tensor:
        """pixels (n, 1176) for the images/videos of grid_thw → image_embeds (n / 4, out_hidden), in one call of the
        smallest bucket that holds them."""
        pixels = torch.as_tensor(pixels)
        return self.run(pixels, grid_thw, choose_bucket(self.buckets, pixels.shape[0]))

    def run(self, pixels: Tensor, grid_thw, bucket: int) -> Tensor:
        """embed() through the given bucket."""
        grid = [tuple(int(v) for v in g) for g in grid_thw]
        inputs = bucket_inputs(self.vit.config, pixels.to(self.vit.patch_embed.proj.weight.dtype), grid, bucket)
        return self.call(inputs)[: inputs.num_patches // self.vit.config.spatial_merge_size**2].to(self.dtype)

    def call(self, inputs: BucketInputs) -> Tensor:
        """One compiled call → (N / 4, out_hidden) for the whole bucket, padding rows included."""
        import tvm

        device = self.vit.patch_embed.proj.weight.device
        args = [tvm.runtime.from_dlpack(t.to(device).contiguous()) for t in inputs.tensors()]
        bucket = inputs.pixels.shape[0]
        return torch.from_dlpack(self.compiled[bucket].main(*args, *self.weights[bucket]))


# ---------------------------------------------------------------------------------------------------------------
# launch.py compile

COMPILE_HELP = """ahead-of-time compilation of the ViT for --visual-backend tvm: one artifact per patch bucket, written
to the cache the visual worker loads from ($QWEN_VL_TVM_CACHE, default ~/.cache/qwen-vl-disagg/tvm). The weights are
inputs, so an artifact serves every checkpoint of the same vision config."""


def compile_arguments(parser: argparse.ArgumentParser) -> None:
    Options.add_arguments(parser, ("model", "dtype"))
    parser.add_argument("--buckets", "--patch-buckets", dest="buckets", default=Options.patch_buckets,
                        help=f"patch counts to compile for, each a multiple of 16 (default {Options.patch_buckets})")
    parser.add_argument("--target", choices=TARGETS, default="llvm",
                        help="llvm: this host's CPU; cuda: NVIDIA GPUs (arch from $QWEN_VL_CUDA_ARCH, default sm_80)")
    parser.add_argument("--tune-trials", type=int, default=0,
                        help="MetaSchedule trials per bucket (llvm; default 0: TVM's untuned build). The database "
                             "is kept beside the cache and reused by later compiles of the same bucket. With "
                             "apache-tvm 0.27.0.post1 tuning crashed here before its first trial (README)")
    parser.add_argument("--cache", type=Path, default=None, help=f"artifact folder (default: ${CACHE_ENV} or "
                        f"{DEFAULT_CACHE})")


def compile_command(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from common.runtime import resolve_dtype

    buckets = parse_patch_buckets(args.buckets)
    if args.tune_trials < 0:
        raise ValueError(f"--tune-trials must be 0 or more, got {args.tune_trials}")
    vit = compute_copy(VisionTransformer.from_pretrained(args.model, resolve_dtype(args.model, args.dtype)))
    cache = ArtifactCache(args.cache)
    with tqdm(buckets, desc="compile", unit="bucket", file=sys.stderr) as bar:
        for bucket in bar:
            t0 = time.perf_counter()
            library = cache.compile(vit, bucket, args.target, args.tune_trials,
                                    progress=lambda stage: bar.set_postfix_str(f"{bucket} patches: {stage}"))
            bar.write(f"{bucket} patches: {library} ({time.perf_counter() - t0:.1f} s)")
    return 0
