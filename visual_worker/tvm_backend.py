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
import contextlib
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


# ---------------------------------------------------------------------------------------------------------------
# CPU schedules: TVM's CPU default pipeline schedules nothing (one core, scalar loops). These rules give every kernel
# of the ViT a fixed schedule without tuning: register-tiled parallel matmuls, one parallel pass per row for softmax
# and norms, parallel vectorized loops for the rest.

MATMUL_TILE = (4, 16)  # rows x columns of a matmul's output held in registers: 8 AVX2 accumulators


def is_reduction(sch, block) -> bool:
    from tvm import tirx

    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def is_matmul(sch, block) -> bool:
    """C[..., i, j] += A[..., i, k] * B[..., k, j] with the reduction last."""
    from tvm import tirx

    b = sch.get(block)
    kinds = [iv.iter_type for iv in b.iter_vars]
    body = b.body
    return (kinds.count(tirx.IterVar.CommReduce) == 1 and kinds[-1] == tirx.IterVar.CommReduce and len(kinds) >= 3
            and isinstance(body, tirx.BufferStore) and isinstance(body.value, tirx.Add)
            and isinstance(body.value.b, tirx.Mul))


def stores_float32(sch, block) -> bool:
    from tvm import tirx

    body = sch.get(block).body
    return isinstance(body, tirx.BufferStore) and str(body.buffer.dtype) == "float32"


def extent(sch, loop) -> int:
    return int(sch.get(loop).extent)


def vectorize_inner(sch, block, lanes: int = 8) -> None:
    inner = sch.get_loops(block)[-1]
    if extent(sch, inner) % lanes == 0 and not is_reduction(sch, block) and stores_float32(sch, block):
        sch.vectorize(sch.split(inner, [None, lanes])[1])


def schedule_matmul(sch, block) -> None:
    """(..., i, j, k) → parallel over (..., i / 4), then j / 16, k, with the 4 x 16 output tile in registers."""
    *batch, i, j, k = sch.get_loops(block)
    rows = MATMUL_TILE[0] if extent(sch, i) % MATMUL_TILE[0] == 0 else 1
    cols = next(c for c in (MATMUL_TILE[1], 8, 1) if extent(sch, j) % c == 0)
    io, ii = sch.split(i, [None, rows])
    jo, ji = sch.split(j, [None, cols])
    sch.reorder(*batch, io, jo, k, ii, ji)
    write_back = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(write_back, jo)
    sch.parallel(sch.fuse(*batch, io) if batch else io)
    sch.unroll(ii)
    if cols > 1:
        sch.vectorize(ji)
        sch.vectorize(sch.get_loops(write_back)[-1])
    sch.decompose_reduction(block, k)
    from tvm.s_tir.schedule import ScheduleError

    for consumer in sch.get_consumers(write_back):  # the bias / activation epilogue, applied as the tile is stored
        with contextlib.suppress(ScheduleError):  # not inlinable here: it stays a loop of its own
            sch.reverse_compute_inline(consumer)


def lane_partials(sch, block, lanes: int = 8):
    """A reduction along a row split into `lanes` partial results (rfactor), each lane reducing every lanes-th
    element, and the lanes reduced after → the partials' block, whose lanes vectorize; None when the row does not
    split evenly."""
    k = sch.get_loops(block)[-1]
    if extent(sch, k) % lanes or not stores_float32(sch, block):
        return None
    _, lane = sch.split(k, [None, lanes])
    return sch.rfactor(lane, factor_axis=-1)  # partials (..., lanes), contiguous per row


def schedule_rows(sch, root) -> None:
    """Reductions along the last axis feeding elementwise work (softmax, RMS norm): one parallel loop over rows,
    every stage of a row computed inside it while the row is in cache, the reductions in 8 vector lanes."""
    out = sch.get_output_blocks(root)[0]
    for b in sch.get_child_blocks(root):
        if not is_reduction(sch, b) and not sch.get(b).same_as(sch.get(out)) and len(sch.get_consumers(b)) == 1:
            sch.compute_inline(b)
    partials = [p for b in sch.get_child_blocks(root) if is_reduction(sch, b)
                if (p := lane_partials(sch, b)) is not None]
    loops = sch.get_loops(out)
    row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    sch.parallel(row)
    vectorize_inner(sch, out)
    stages = [b for b in sch.get_child_blocks(root) if not sch.get(b).same_as(sch.get(out))]
    for b in reversed(stages):
        sch.compute_at(b, row)
    for b in stages:
        vectorize_inner(sch, b)
    for p in partials:
        *_, lane, k = sch.get_loops(p)  # compute_at put the lanes outside the reduction
        sch.reorder(k, lane)
        sch.vectorize(lane)


def schedule_loops(sch, block) -> None:
    """Any other loop nest: its leading spatial loops fused and parallel (256 iterations or more where the nest
    allows), the innermost vectorized when the nest is all spatial."""
    from tvm import tirx

    loops = sch.get_loops(block)
    spatial = [loop for loop, iv in zip(loops, sch.get(block).iter_vars) if iv.iter_type == tirx.IterVar.DataPar]
    spatial = spatial[: next((n for n, iv in enumerate(sch.get(block).iter_vars)
                              if iv.iter_type != tirx.IterVar.DataPar), len(loops))]
    if not spatial:
        return
    outer, count = [], 1
    for loop in spatial[:-1] or spatial:
        outer.append(loop)
        count *= extent(sch, loop)
        if count >= 256:
            break
    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    if len(spatial) == len(loops) > len(outer):
        vectorize_inner(sch, block)


def schedule_cpu(sch) -> None:
    """Schedules the one PrimFunc of sch (a kernel of the legalized ViT) for the CPU, in place. Also a MetaSchedule
    design space (tune), so a tuned kernel is measured against this one."""
    from tvm import tirx
    from tvm.s_tir.schedule import ScheduleError

    root = sch.get_sblock("root")
    blocks = sch.get_child_blocks(root)
    matmuls = [b for b in blocks if is_matmul(sch, b)]
    outputs = [sch.get(b) for b in sch.get_output_blocks(root)]
    if not matmuls and len(outputs) == 1 and any(is_reduction(sch, b) for b in blocks):
        schedule_rows(sch, root)
        return
    matmul = matmuls[0] if len(matmuls) == 1 else None
    prologue = {sch.get(p) for p in sch.get_producers(matmul)} if matmul is not None else set()
    for b in blocks:  # elementwise steps inlined into their consumers; never into a matmul's inner loop
        if b is not matmul and sch.get(b) not in prologue and not any(sch.get(b).same_as(o) for o in outputs):
            with contextlib.suppress(ScheduleError):  # a reduction or a block with several consumers: its own loop
                sch.compute_inline(b)
    if matmul is not None:
        schedule_matmul(sch, matmul)
    for b in sch.get_child_blocks(root):
        if all(sch.get(loop).kind == tirx.ForKind.SERIAL for loop in sch.get_loops(b)):
            schedule_loops(sch, b)


def scheduled_cpu(func):
    """A PrimFunc → the same computation under schedule_cpu."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    schedule_cpu(sch)
    return sch.mod["main"]


def lowering_passes(target) -> list:
    """TVM's CPU passes up to fused TIR kernels, softmax legalized to TOPI's fast_softmax."""
    from tvm import relax, topi
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    softmax = {"relax.nn.softmax": lambda bb, call: bb.call_te(topi.nn.fast_softmax, call.args[0],
                                                                int(call.attrs.axis))}
    legalize = cpu.legalize_passes(target)  # LegalizeOps first, then fusion
    return cpu.library_dispatch_passes(target) + [relax.transform.LegalizeOps(softmax)] + legalize[1:]


def fused_kernels(mod, target):
    """The module as cpu_pipeline schedules it: fused TIR kernels, unscheduled (what MetaSchedule tunes)."""
    import tvm

    with target:
        return tvm.transform.Sequential(lowering_passes(target))(mod)


def scheduling_passes(target, tuning_dir: Path) -> list:
    """lowering_passes, then the MetaSchedule database in tuning_dir applied where it has a kernel (marking it
    tirx.is_scheduled), then schedule_cpu for every kernel it lacks."""
    import tvm
    from tvm import relax, tirx

    @tvm.transform.module_pass(opt_level=0, name="ScheduleCPU")
    def schedule_pass(mod, _ctx):
        return tvm.IRModule({gv: scheduled_cpu(f) if isinstance(f, tirx.PrimFunc) and "tirx.is_scheduled" not in
                             (f.attrs or {}) else f for gv, f in mod.functions.items()}, attrs=mod.attrs)

    database = ([relax.transform.MetaScheduleApplyDatabase(str(tuning_dir))]
                if (tuning_dir / "database_workload.json").exists() else [])
    return lowering_passes(target) + database + [schedule_pass]


def cpu_pipeline(target, tuning_dir: Path):
    """TVM's CPU pipeline with softmax legalized to TOPI's fast_softmax (a polynomial exp that vectorizes, within
    float32 rounding of the exact one) and every kernel scheduled (scheduling_passes)."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(scheduling_passes(target, tuning_dir) + cpu.dataflow_lower_passes(target)
                                            + cpu.finalize_passes(target))(mod)

    return pipeline


def tuning_records(tuning_dir: Path) -> int:
    """Records in a MetaSchedule database (0: none). Part of the artifact's key: more tuning, a new artifact."""
    records = tuning_dir / "database_tuning_record.json"
    return sum(1 for _ in records.open()) if records.exists() else 0


TUNE_EXTRA = "pip install 'qwen-vl-disagg[tune]' (cloudpickle, xgboost)"


def check_tuning_installed() -> None:
    """A clear error, before any work, when MetaSchedule cannot run here. apache-tvm 0.27.0.post1 needs
    apache-tvm-ffi 0.1.14 (pyproject pins it): 0.1.15 segfaults serializing any TIR expression
    (tvm::ffi::ToJSONGraph), which MetaSchedule does for every task and candidate."""
    import importlib.util

    import tvm_ffi

    if not tvm_ffi.__version__.startswith("0.1.14"):
        raise RuntimeError(f"--tune-trials needs apache-tvm-ffi 0.1.14 (installed: {tvm_ffi.__version__}, whose "
                           "serializer segfaults on TIR with apache-tvm 0.27.0.post1): pip install "
                           "'apache-tvm-ffi==0.1.14.post1'; the untuned build needs none of it")
    missing = [name for name in ("cloudpickle", "xgboost") if importlib.util.find_spec(name) is None]
    if missing:
        raise RuntimeError(f"--tune-trials needs {' and '.join(missing)} (MetaSchedule's runner and cost model): "
                           f"{TUNE_EXTRA}; the untuned build needs neither")


def in_process_builder():
    """A MetaSchedule builder that compiles candidates in this process. LocalBuilder starts fresh processes for every
    batch, and each spends 45 s of CPU importing tvm.s_tir.tensor_intrin (TVMScript for every GPU's intrinsics, most
    of it CUDA's) before building anything: past its timeout on a busy machine, and a minute a batch otherwise. The
    tuning process has imported them once already."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            results = []
            for task in build_inputs:
                try:
                    results.append(BuilderResult(default_export(default_build(task.mod, task.target, None)), None))
                except Exception as error:  # a candidate that does not build is a failed trial, as in LocalBuilder
                    results.append(BuilderResult(None, f"in-process builder: {type(error).__name__}: {error}"))
            return results

    return InProcessBuilder()


# the kernels MetaSchedule tunes; the rest keep schedule_cpu. Not softmax: building one of its candidates (the
# polynomial exp unrolled) took minutes each here, and the built-in row pass already vectorizes it
TUNED_OPS = ("matmul",)


def tune(mod, target, tune_trials: int, tuning_dir: Path) -> None:
    """tune_trials MetaSchedule trials over the ViT's matmul kernels, added to the JSON database in tuning_dir. Each
    of those kernels is first measured once under schedule_cpu, into the same database, so the schedule a later build
    applies is never one measured slower than the built-in one. Candidates are built in process and measured in
    LocalRunner's one warm worker."""
    from tvm.s_tir import meta_schedule as ms

    check_tuning_installed()
    kernels = fused_kernels(mod, target)
    tasks = [t for t in ms.relax_integration.extract_tasks(kernels, target)
             if any(op in t.task_name for op in TUNED_OPS)]
    tuning_dir.mkdir(parents=True, exist_ok=True)
    measure = dict(op_names=list(TUNED_OPS), builder=in_process_builder(), runner=ms.runner.LocalRunner(timeout_sec=60))
    ms.relax_integration.tune_relax(kernels, {}, target, str(tuning_dir), max_trials_global=len(tasks),
                                    max_trials_per_task=1, num_trials_per_iter=1, strategy="replay-trace",
                                    space=ms.space_generator.ScheduleFn(schedule_cpu), **measure)
    ms.relax_integration.tune_relax(kernels, {}, target, str(tuning_dir), max_trials_global=tune_trials,
                                    num_trials_per_iter=max(1, min(64, tune_trials // len(tasks))), **measure)


def build(mod, target, tune_trials: int, tuning_dir: Path):
    """IRModule → executable. llvm: cpu_pipeline, after tuning tune_trials more MetaSchedule trials into the
    database when asked. GPU targets get TVM's dlight schedules by default."""
    import tvm

    if target.kind.name != "llvm":
        return tvm.compile(mod, target=target)
    if tune_trials > 0:
        tune(mod, target, tune_trials, tuning_dir)
    return tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(target, tuning_dir))


@dataclass
class Compiled:
    """One loaded artifact: its VM's main function and the weight names it takes, in order."""

    main: object
    weight_names: list[str]
    compiled_s: float | None  # seconds spent compiling now; None when it was loaded from the cache
    load_s: float


class ArtifactCache:
    """Compiled ViTs on disk: <root>/<digest>.so with <digest>.json (its key and weight names) beside it, MetaSchedule
    databases in <root>/tuning/<digest of the key without its tuning count>/. `compiles` counts the compilations this
    object has done."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else cache_root()
        self.compiles = 0

    def tuning_dir(self, vit: VisionTransformer, bucket: int, target) -> Path:
        return self.root / "tuning" / key_digest(cache_key(vit.config, bucket, vit.patch_embed.proj.weight.dtype,
                                                           target))

    def key(self, vit: VisionTransformer, bucket: int, target) -> dict:
        """cache_key with the number of tuning records the build applies: a database that grew is a new artifact."""
        records = tuning_records(self.tuning_dir(vit, bucket, target)) if target.kind.name == "llvm" else 0
        return cache_key(vit.config, bucket, vit.patch_embed.proj.weight.dtype, target) | {"tuning": records}

    def paths(self, key: dict) -> tuple[Path, Path]:
        digest = key_digest(key)
        return self.root / f"{digest}.so", self.root / f"{digest}.json"

    def compile(self, vit: VisionTransformer, bucket: int, target_kind: str, tune_trials: int = 0,
                progress=None) -> Path:
        """Compiles one bucket and writes it to the cache (replacing what was there) → the artifact's path."""
        target = make_target(target_kind)
        say = progress or (lambda stage: None)
        say("export")
        mod, names = export_graph(vit, bucket)
        say("tune" if tune_trials else "compile")
        executable = build(mod, target, tune_trials, self.tuning_dir(vit, bucket, target))
        key = self.key(vit, bucket, target)  # after tuning: with the records it applied
        library, meta = self.paths(key)
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

        key = self.key(vit, bucket, make_target(target_kind))
        library, meta = self.paths(key)
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
                        help="MetaSchedule trials per bucket (llvm; default 0: the built-in CPU schedules only). "
                             "The database is kept beside the cache and applied by later compiles of the same bucket "
                             "where it has a kernel. Needs apache-tvm-ffi 0.1.14 (README)")
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
