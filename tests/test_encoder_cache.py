"""The visual worker's encoder cache: an image seen before (same bytes, same pixel limits) skips the ViT and gives
the same tokens; other limits, other bytes or a zero budget miss; least recently used entries go first."""

import pytest
import torch

from common.messages import PixelLimits
from common.options import Options
from frontend.pipeline import Pipeline, collect
from frontend.prompt import Prompter
from tests.test_pipeline import CASES, PNG, reference_tokens, request
from visual_worker.cache import EncoderCache


def entry(rows: int) -> torch.Tensor:
    return torch.zeros(rows, 4)  # 16 bytes a row


def test_the_least_recently_used_entry_goes_first_past_the_budget():
    cache = EncoderCache(budget_bytes=3 * 16)
    for name in (b"a", b"b", b"c"):
        cache.put(name, entry(1), (1, 2, 2))
    assert cache.get(b"a") is not None  # a is now the most recent
    cache.put(b"d", entry(1), (1, 2, 2))
    assert cache.get(b"b") is None and all(cache.get(k) is not None for k in (b"a", b"c", b"d"))
    cache.put(b"huge", entry(4), (1, 4, 4))  # larger than the whole budget: not kept, nothing evicted
    assert cache.get(b"huge") is None and cache.bytes == 3 * 16


def test_the_key_is_the_bytes_and_the_pixel_limits():
    assert EncoderCache.key(b"png", None, None) == EncoderCache.key(b"png", None, None)
    assert len({EncoderCache.key(b"png", None, None), EncoderCache.key(b"png", 3136, None),
                EncoderCache.key(b"png", None, 3136), EncoderCache.key(b"gif", None, None)}) == 4


@pytest.fixture(scope="module")
def cached_pipeline(tiny_model):
    pipeline = Pipeline(Options(model=tiny_model, dtype="float32", chunk_width=24))
    pipeline.start()
    pipeline.wait_ready()
    prompter = Prompter(tiny_model, pipeline.context_len)

    def ask(case: dict, pixels: PixelLimits = PixelLimits()) -> dict:
        messages, sampling = request(**case)
        return collect(pipeline, prompter.request(messages, sampling, pixels))

    yield ask
    pipeline.close()


def test_a_second_identical_image_skips_the_vit_and_answers_the_same(cached_pipeline, reference, tiny_model):
    case = dict(prompt="What is this?", images=[PNG["wide"]])
    first, second = cached_pipeline(case), cached_pipeline(case)
    assert first["timings"]["encoder_cache_hits"] == 0 and second["timings"]["encoder_cache_hits"] == 1
    assert second["timings"]["vit_s"] < first["timings"]["vit_s"]
    assert first["token_ids"] == second["token_ids"] == reference_tokens(reference, tiny_model, **case)


def test_other_pixel_limits_miss(cached_pipeline):
    case = dict(prompt="What is this?", images=[PNG["odd"]])
    cached_pipeline(case)
    assert cached_pipeline(case, PixelLimits(max_pixels=3136))["timings"]["encoder_cache_hits"] == 0


def test_a_request_with_one_seen_and_one_new_image_runs_the_vit_on_the_new_one_only(cached_pipeline, reference,
                                                                                       tiny_model):
    cached_pipeline(dict(prompt="One.", images=[PNG["small"]]))
    case = CASES["two images"]  # tall (new), then small (seen)
    result = cached_pipeline(case)
    assert result["timings"]["encoder_cache_hits"] == 1
    assert result["token_ids"] == reference_tokens(reference, tiny_model, **case)


def test_a_zero_budget_caches_nothing(tiny_model):
    pipeline = Pipeline(Options(model=tiny_model, dtype="float32", encoder_cache_mb=0))
    try:
        pipeline.start()
        pipeline.wait_ready()
        prompter = Prompter(tiny_model, pipeline.context_len)
        for _ in range(2):
            result = collect(pipeline, prompter.request(*request(prompt="Hi", images=[PNG["small"]])))
            assert result["timings"]["encoder_cache_hits"] == 0
    finally:
        pipeline.close()
