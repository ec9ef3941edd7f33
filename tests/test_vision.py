"""The vision tower equals transformers' Qwen2_5_VisionTransformerPretrainedModel on the same weights."""

import pytest
import torch

from common.config import load_config
from visual_worker.vision import VisionTransformer, make_layout

GRIDS = {
    "one window": [(1, 8, 8)],
    "2x3 windows": [(1, 16, 24)],
    "edge windows smaller than 4x4": [(1, 10, 6)],
    "extreme aspect": [(1, 2, 100)],
    "two images": [(1, 16, 24), (1, 10, 6)],
    "video, 3 temporal patches": [(3, 12, 20)],
    "image and video": [(1, 8, 12), (2, 6, 8)],
}


@pytest.fixture(scope="module")
def vit(tiny_model):
    return VisionTransformer.from_pretrained(tiny_model, dtype=torch.float32)


@pytest.mark.parametrize("grids", GRIDS.values(), ids=GRIDS.keys())
def test_vit_output_matches_transformers(vit, reference, grids):
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), 1176, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference.model.visual(pixels, grid_thw=torch.tensor(grids)).pooler_output
    assert (vit.embed(pixels, grids) - expected).abs().max() < 1e-4


@pytest.mark.parametrize("budget", [1024, 1536])
def test_fixed_patch_budget_gives_the_same_embeddings(vit, budget):
    grids = [(1, 16, 24), (1, 10, 6)]  # 444 patches, padded to the budget
    pixels = torch.randn(444, 1176)
    assert torch.allclose(vit.embed(pixels, grids, pad_to=budget), vit.embed(pixels, grids), atol=1e-5)


def test_vit_exports_with_torch_export_at_a_fixed_patch_budget(vit):
    layout = make_layout(vit.config, [(1, 10, 6)], pad_to=512)
    pixels = torch.nn.functional.pad(torch.randn(60, 1176), (0, 0, 0, 452))
    exported = torch.export.export(vit, (pixels, layout))
    assert torch.equal(exported.module()(pixels, layout), vit(pixels, layout))


def test_patch_budget_must_be_a_multiple_of_16_and_fit(vit):
    with pytest.raises(ValueError, match="multiple of 16"):
        vit.embed(torch.randn(64, 1176), [(1, 8, 8)], pad_to=72)
    with pytest.raises(ValueError, match="at least 64"):
        vit.embed(torch.randn(64, 1176), [(1, 8, 8)], pad_to=48)


def test_windows_are_4x4_merged_tokens_and_edge_windows_are_smaller(tiny_model):
    # grid 10x6 patches = 5x3 merged tokens: a 4x3 window (48 patches) above a 1x3 window (12 patches)
    layout = make_layout(load_config(tiny_model).vision, [(1, 10, 6)])
    assert [tuple(g.shape) for g in layout.windows.gathers] == [(1, 12), (1, 48)]  # (windows, patches) by length
    # merged tokens in window order: rows 0-3 first, then row 4 (ids are row-major over the 5x3 grid)
    assert layout.merged_order.tolist() == list(range(15))
    wide = make_layout(load_config(tiny_model).vision, [(1, 8, 16)])  # 4x8 merged: two 4x4 windows side by side
    assert wide.merged_order.tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27,
                                          4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31]
    assert [tuple(g.shape) for g in wide.windows.gathers] == [(2, 64)]  # both windows full: one batched call


def test_full_attention_is_per_video_frame(tiny_model):
    layout = make_layout(load_config(tiny_model).vision, [(3, 4, 4)])
    assert [tuple(g.shape) for g in layout.images.gathers] == [(3, 16)]


def test_visual_half_reads_only_visual_tensors(tiny_model):
    from common.checkpoint import VISUAL, read_tensors

    tensors = read_tensors(tiny_model, VISUAL, torch.float32)
    assert tensors and all(name.startswith("visual.") for name in tensors)
