"""The compiled visual backend (--visual-backend tvm) gives the eager ViT's embeddings in every patch bucket, picks the
smallest bucket that holds a request, refuses a request past the largest by name, loads a second start from its
cache without compiling, misses the cache when the vision config or TVM version changes, and gives transformers'
greedy tokens through the whole pipeline. On CPU every kernel gets a parallel schedule without tuning; a tuning
database that grew is a new artifact."""

import dataclasses
import io
import time

import pytest
import torch
from PIL import Image

from common.options import Options, parse_patch_buckets
from frontend.pipeline import Pipeline, collect
from frontend.prompt import Prompter
from tests.test_pipeline import CASES, reference_tokens, request
from visual_worker.tvm_backend import (CACHE_ENV, TUNED_OPS, ArtifactCache, TvmVisionBackend, bucket_inputs,
                                       choose_bucket, export_graph, fused_kernels, make_target, scheduled_cpu,
                                       scheduling_passes, tune, tuning_records)
from visual_worker.vision import VisionTransformer

BUCKETS = [208, 1024]  # 208 is no multiple of the 64-patch window block: the banded attention pads it inside
GRIDS = {  # each fits the smallest bucket, so every case runs in every bucket
    "one window": [(1, 8, 8)],
    "edge windows smaller than 4x4": [(1, 10, 14)],
    "extreme aspect": [(1, 2, 100)],
    "two images": [(1, 8, 12), (1, 10, 6)],
    "video, 3 temporal patches": [(3, 6, 8)],
    "image and video": [(1, 4, 8), (2, 6, 8)],
}


def pixels_for(grids, seed=1) -> torch.Tensor:
    return torch.randn(sum(t * h * w for t, h, w in grids), 1176, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def tvm_cache(tmp_path_factory):
    """One artifact cache for the session, also seen by the worker processes the pipeline tests start."""
    root = tmp_path_factory.mktemp("tvm_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(root))
        yield root


@pytest.fixture(scope="module")
def vit(tiny_model):
    return VisionTransformer.from_pretrained(tiny_model, dtype=torch.float32)


@pytest.fixture(scope="module")
def backend(vit, tvm_cache):
    """The first start: compiles every bucket into the empty cache."""
    backend = TvmVisionBackend(vit, BUCKETS, cache=ArtifactCache(tvm_cache))
    assert backend.cache.compiles == len(BUCKETS)
    return backend


@pytest.mark.parametrize("bucket", BUCKETS)
@pytest.mark.parametrize("grids", GRIDS.values(), ids=GRIDS.keys())
def test_compiled_vit_equals_eager_and_transformers_in_every_bucket(backend, vit, reference, grids, bucket):
    pixels = pixels_for(grids)
    with torch.no_grad():
        expected = reference.model.visual(pixels, grid_thw=torch.tensor(grids)).pooler_output
    compiled = backend.run(pixels, grids, bucket)
    assert (compiled - vit.embed(pixels, grids)).abs().max() < 1e-4
    assert (compiled - expected).abs().max() < 1e-4


def test_padding_patches_do_not_reach_the_image(backend, vit):
    grids = GRIDS["two images"]
    pixels = pixels_for(grids)
    inputs = bucket_inputs(vit.config, pixels, grids, 208)
    noisy = dataclasses.replace(inputs, pixels=inputs.pixels.clone())
    noisy.pixels[inputs.num_patches:] = 100 * torch.randn(208 - inputs.num_patches, 1176)
    real = inputs.num_patches // 4
    assert torch.allclose(backend.call(noisy)[:real], backend.call(inputs)[:real], atol=1e-5)


def test_a_request_takes_the_smallest_bucket_that_holds_all_its_images(backend, monkeypatch):
    assert [choose_bucket(BUCKETS, n) for n in (16, 208, 209, 1024)] == [208, 208, 1024, 1024]
    used = []
    run = backend.run
    monkeypatch.setattr(backend, "run", lambda pixels, grids, bucket: used.append(bucket) or run(pixels, grids, bucket))
    backend.embed(pixels_for([(1, 8, 8)]), [(1, 8, 8)])  # 64 patches
    backend.embed(pixels_for([(1, 16, 24), (1, 10, 6)]), [(1, 16, 24), (1, 10, 6)])  # 384 + 60, one call
    assert used == [208, 1024]


def test_a_request_past_the_largest_bucket_is_refused_with_its_patch_count(backend):
    with pytest.raises(ValueError, match=r"1040 patches, more than the largest patch bucket, 1024 \(--patch-buckets "
                                         r"208,1024\)"):
        backend.embed(pixels_for([(1, 20, 52)]), [(1, 20, 52)])


def test_patch_buckets_must_be_multiples_of_16():
    assert parse_patch_buckets("5120,1024,4096") == [1024, 4096, 5120]
    for bad in ("1000", "0", "1024,,4096", "a,1024", "-16"):
        with pytest.raises(ValueError, match="multiple of 16"):
            Options(patch_buckets=bad).check()


def test_a_second_start_loads_every_bucket_without_compiling(backend, vit, tvm_cache):
    t0 = time.perf_counter()
    second = TvmVisionBackend(vit, BUCKETS, cache=ArtifactCache(tvm_cache))
    start_s = time.perf_counter() - t0
    assert second.cache.compiles == 0
    assert all(c.compiled_s is None for c in second.compiled.values())
    first_s = sum(c.compiled_s + c.load_s for c in backend.compiled.values())
    assert start_s < first_s / 5, f"second start {start_s:.2f} s, first {first_s:.2f} s"
    grids = GRIDS["two images"]
    assert torch.equal(second.embed(pixels_for(grids), grids), backend.embed(pixels_for(grids), grids))


def test_a_changed_vision_config_is_a_cache_miss_not_a_wrong_result(backend, vit, tvm_cache):
    # the same weights with full attention in block 0 instead of 1: an artifact of the old config would run, wrongly
    config = dataclasses.replace(vit.config, fullatt_block_indexes=(0,))
    changed = VisionTransformer(config).eval()
    changed.load_state_dict(vit.state_dict())
    other = TvmVisionBackend(changed, [208], cache=ArtifactCache(tvm_cache))
    assert other.cache.compiles == 1
    grids = [(1, 2, 100)]  # 13 windows in a row: block 0 now sees all of them
    pixels = pixels_for(grids)
    assert (other.embed(pixels, grids) - changed.embed(pixels, grids)).abs().max() < 1e-4
    # the old artifact would be off by this much (random tiny weights attend almost evenly: the change is small)
    assert (changed.embed(pixels, grids) - vit.embed(pixels, grids)).abs().max() > 3e-4


def test_another_tvm_version_is_a_cache_miss(backend, vit, tvm_cache, monkeypatch):
    import tvm

    monkeypatch.setattr(tvm, "__version__", "0.0.0-other")
    assert TvmVisionBackend(vit, [208], cache=ArtifactCache(tvm_cache)).cache.compiles == 1


def test_compile_writes_what_the_worker_loads(vit, tmp_path):
    cache = ArtifactCache(tmp_path)
    stages = []
    library = cache.compile(vit, 64, "llvm", progress=stages.append)
    assert library.exists() and stages == ["export", "compile"]
    assert TvmVisionBackend(vit, [64], cache=ArtifactCache(tmp_path)).cache.compiles == 0


def test_every_cpu_kernel_gets_a_parallel_schedule_without_tuning(vit):
    import tvm

    kernels = fused_kernels(export_graph(vit, 208)[0], make_target("llvm"))
    scheduled = {gv.name_hint: scheduled_cpu(f).script() for gv, f in kernels.functions.items()
                 if isinstance(f, tvm.tirx.PrimFunc)}
    assert scheduled and [name for name, script in scheduled.items() if "T.parallel" not in script] == []
    assert all("T.vectorized" in script for name, script in scheduled.items() if "matmul" in name or "softmax" in name)


def test_a_tuning_database_that_grew_is_a_new_artifact(vit, tmp_path):
    cache, target = ArtifactCache(tmp_path), make_target("llvm")
    before = cache.key(vit, 208, target)
    records = cache.tuning_dir(vit, 208, target)
    records.mkdir(parents=True)
    (records / "database_tuning_record.json").write_text("[0, []]\n")
    assert before["tuning"] == 0 and cache.key(vit, 208, target)["tuning"] == 1
    assert cache.paths(before) != cache.paths(cache.key(vit, 208, target))


def test_a_tuned_build_applies_its_database_to_every_matmul_and_stays_exact(vit, tmp_path):
    import tvm

    cache, target = ArtifactCache(tmp_path), make_target("llvm")
    cache.compile(vit, 64, "llvm", tune_trials=8)
    tuning_dir = cache.tuning_dir(vit, 64, target)
    assert tuning_records(tuning_dir) > 8  # one measurement of schedule_cpu per matmul kernel, then the 8 trials
    with target:
        kernels = tvm.transform.Sequential(scheduling_passes(target, tuning_dir))(export_graph(vit, 64)[0])
    from_database = {gv.name_hint: "tirx.is_scheduled" in (f.attrs or {}) for gv, f in kernels.functions.items()
                     if isinstance(f, tvm.tirx.PrimFunc)}
    assert from_database == {name: any(op in name for op in TUNED_OPS) for name in from_database}
    tuned = TvmVisionBackend(vit, [64], cache=ArtifactCache(tmp_path))
    assert tuned.cache.compiles == 0  # the artifact compile() wrote, keyed with the database's records
    for grids in ([(1, 8, 8)], [(1, 4, 8), (1, 2, 16)]):
        pixels = pixels_for(grids)
        assert (tuned.embed(pixels, grids) - vit.embed(pixels, grids)).abs().max() < 1e-4


def test_tuning_refuses_the_tvm_ffi_whose_serializer_segfaults(vit, tmp_path, monkeypatch):
    import tvm_ffi

    monkeypatch.setattr(tvm_ffi, "__version__", "0.1.15.post2")
    with pytest.raises(RuntimeError, match=r"needs apache-tvm-ffi 0\.1\.14 \(installed: 0\.1\.15\.post2"):
        tune(None, make_target("llvm"), 8, tmp_path)


def test_tuning_without_its_extra_says_how_to_install_it(monkeypatch, tmp_path):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "xgboost" else find_spec(name))
    with pytest.raises(RuntimeError, match=r"needs xgboost .*pip install 'qwen-vl-disagg\[tune\]'"):
        tune(None, make_target("llvm"), 8, tmp_path)


@pytest.fixture(scope="module")
def tvm_pipeline(tiny_model, backend):
    """Both workers as real processes, the visual one on the compiled backend (its artifacts in the session cache)."""
    pipeline = Pipeline(Options(model=tiny_model, dtype="float32", chunk_width=24, visual_backend="tvm",
                                patch_buckets=",".join(map(str, BUCKETS))))
    pipeline.start()
    pipeline.wait_ready()
    prompter = Prompter(tiny_model, pipeline.context_len)
    yield lambda req: collect(pipeline, prompter.request(*req))
    pipeline.close()


PIPELINE_CASES = {k: CASES[k] for k in ("small image", "odd-sized image", "two images", "video")}


@pytest.mark.parametrize("case", PIPELINE_CASES.values(), ids=PIPELINE_CASES.keys())
def test_pipeline_on_the_tvm_backend_gives_transformers_greedy_tokens(tvm_pipeline, reference, tiny_model, case):
    assert tvm_pipeline(request(**case))["token_ids"] == reference_tokens(reference, tiny_model, **case)


def test_pipeline_refuses_a_request_past_the_largest_bucket_and_goes_on(tvm_pipeline, reference, tiny_model):
    buf = io.BytesIO()
    Image.new("RGB", (500, 500), "white").save(buf, format="PNG")  # 504 x 504 px: 36 x 36 = 1296 patches
    with pytest.raises(RuntimeError, match="1296 patches, more than the largest patch bucket, 1024"):
        tvm_pipeline(request("What is this?", images=[buf.getvalue()]))
    case = CASES["small image"]
    assert tvm_pipeline(request(**case))["token_ids"] == reference_tokens(reference, tiny_model, **case)
