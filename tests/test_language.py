"""The LLM half equals transformers' Qwen2_5_VLForConditionalGeneration: M-RoPE ids, logits, greedy tokens."""

import pytest
import torch

from common.config import load_config
from common.messages import SamplingParams
from llm_worker.engine import Engine
from llm_worker.inputs import prefill_inputs
from llm_worker.model import LanguageModel
from llm_worker.rope import rope_index
from visual_worker.vision import VisionTransformer

IMG, VID, START, END = 151655, 151656, 151652, 151653
IM_START, IM_END = 151644, 151645


def prompt(*parts) -> list[int]:
    """Token ids from text ids and ('image' | 'video', grid) parts, pads expanded as the chat template does."""
    ids = []
    for part in parts:
        if isinstance(part, tuple):
            kind, (t, h, w) = part
            ids += [START] + [IMG if kind == "image" else VID] * (t * h * w // 4) + [END]
        else:
            ids += part
    return ids


# name: (ids, image grids, video grids, second_per_grid_ts)
CASES = {
    "text only": (prompt([IM_START, 872, 198, 9707, 1879, IM_END, 198]), [], [], []),
    "one image": (prompt([IM_START, 872, 198], ("image", (1, 16, 24)), [3838, 374, 419, 30]), [(1, 16, 24)], [], []),
    "two images": (
        prompt([872, 198], ("image", (1, 8, 12)), [323], ("image", (1, 10, 6)), [30, 30]),
        [(1, 8, 12), (1, 10, 6)], [], [],
    ),
    "video at 2 fps": (prompt([872], ("video", (4, 8, 8)), [3838, 30]), [], [(4, 8, 8)], [1.0]),
    "video at 0.5 fps": (prompt([872], ("video", (3, 6, 10)), [30]), [], [(3, 6, 10)], [4.0]),
    "image and video": (
        prompt([872], ("image", (1, 8, 8)), [323], ("video", (2, 8, 12)), [30]),
        [(1, 8, 8)], [(2, 8, 12)], [2.0 / 3],
    ),
}


def mm_types(ids: torch.Tensor) -> torch.Tensor:
    return (ids == IMG).int() + 2 * (ids == VID).int()


def reference_rope(reference, ids: list[int], images, videos, seconds):
    input_ids = torch.tensor([ids])
    pos, delta = reference.model.get_rope_index(
        input_ids, mm_types(input_ids), image_grid_thw=torch.tensor(images) if images else None,
        video_grid_thw=torch.tensor(videos) if videos else None,
        second_per_grid_ts=torch.tensor(seconds) if seconds else None,
    )
    return pos[:, 0], int(delta)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_rope_index_matches_transformers(reference, case):
    ids, images, videos, seconds = case
    expected, expected_delta = reference_rope(reference, ids, images, videos, seconds)
    pos, delta = rope_index(ids, images, videos, seconds, image_token_id=IMG, video_token_id=VID, tokens_per_second=2)
    assert torch.equal(pos, expected)
    assert delta == expected_delta


def test_rope_index_hand_worked():
    # 2 text tokens, a 1x4x6 image (2x3 merged tokens), 1 text token
    pos, delta = rope_index([1, 2, IMG, IMG, IMG, IMG, IMG, IMG, 3], [(1, 4, 6)], image_token_id=IMG, video_token_id=VID)
    assert pos.tolist() == [
        [0, 1, 2, 2, 2, 2, 2, 2, 5],  # t
        [0, 1, 2, 2, 2, 3, 3, 3, 5],  # h
        [0, 1, 2, 3, 4, 2, 3, 4, 5],  # w: text resumes at 2 + max(2, 3)
    ]
    assert delta == 6 - 9


def test_rope_index_of_a_left_padded_batch_matches_transformers(reference):
    rows = [CASES["one image"], CASES["text only"], CASES["two images"]]
    width = max(len(r[0]) for r in rows)
    input_ids = torch.tensor([[0] * (width - len(r[0])) + r[0] for r in rows])
    mask = torch.tensor([[0] * (width - len(r[0])) + [1] * len(r[0]) for r in rows])
    images = [g for r in rows for g in r[1]]
    expected, deltas = reference.model.get_rope_index(
        input_ids, mm_types(input_ids), image_grid_thw=torch.tensor(images), attention_mask=mask
    )
    for b, (ids, grids, _, _) in enumerate(rows):
        pos, delta = rope_index(ids, grids, image_token_id=IMG, video_token_id=VID)
        assert torch.equal(pos, expected[:, b, width - len(ids):])
        assert delta == int(deltas[b])


def test_rope_index_rejects_pads_that_do_not_fit_the_grid():
    with pytest.raises(ValueError, match="does not match grid"):
        rope_index([IMG] * 5, [(1, 4, 4)], image_token_id=IMG, video_token_id=VID)
    with pytest.raises(ValueError, match="more runs of image pad tokens"):
        rope_index([IMG] * 4, [], image_token_id=IMG, video_token_id=VID)


@pytest.fixture(scope="module")
def ours(tiny_model):
    return (
        load_config(tiny_model),
        VisionTransformer.from_pretrained(tiny_model, dtype=torch.float32),
        LanguageModel.from_pretrained(tiny_model, dtype=torch.float32),
    )


def vision_inputs(case, seed=0):
    ids, images, videos, seconds = case
    g = torch.Generator().manual_seed(seed)
    pix = torch.randn(sum(t * h * w for t, h, w in images), 1176, generator=g) if images else None
    pix_v = torch.randn(sum(t * h * w for t, h, w in videos), 1176, generator=g) if videos else None
    return pix, pix_v


def reference_kwargs(case, pix, pix_v):
    ids, images, videos, seconds = case
    input_ids = torch.tensor([ids])
    kwargs = dict(input_ids=input_ids, mm_token_type_ids=mm_types(input_ids))
    if images:
        kwargs.update(pixel_values=pix, image_grid_thw=torch.tensor(images))
    if videos:
        kwargs.update(pixel_values_videos=pix_v, video_grid_thw=torch.tensor(videos),
                      second_per_grid_ts=torch.tensor(seconds))
    return kwargs


def our_prefill(ours, case, pix, pix_v):
    config, vit, lm = ours
    ids, images, videos, seconds = case
    image_embeds = vit.embed(pix, images) if images else None
    video_embeds = vit.embed(pix_v, videos) if videos else None
    return prefill_inputs(lm, config, ids, image_embeds, video_embeds, images, videos, seconds)


@pytest.mark.parametrize("name", ["text only", "two images", "image and video"])
def test_logits_match_transformers_at_prefill_and_over_16_decode_steps(ours, reference, name):
    case = CASES[name]
    pix, pix_v = vision_inputs(case)
    kwargs = reference_kwargs(case, pix, pix_v)
    with torch.no_grad():
        prefill_logits = reference(**kwargs).logits[0]
        out = reference.generate(**kwargs, max_new_tokens=17, min_new_tokens=17, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(case[0]):].tolist()
    _, _, lm = ours
    embeds, positions, delta = our_prefill(ours, case, pix, pix_v)
    S = embeds.shape[0]
    cache = lm.new_cache(1, S + 32)
    with torch.inference_mode():
        logits = lm(embeds[None], positions[:, None], torch.arange(S)[None], cache)[0]
        assert (logits - prefill_logits).abs().max() < 1e-4
        for step in range(16):
            slot = torch.tensor([[S + step]])
            step_logits = lm(lm.embed(torch.tensor([[tokens[step]]])), (slot + delta)[None].expand(3, 1, 1), slot, cache)
            assert (step_logits[0, -1] - out.logits[step + 1][0]).abs().max() < 1e-4, f"decode step {step}"


@pytest.mark.parametrize("name", CASES.keys())
def test_greedy_tokens_equal_transformers_generate(ours, reference, name):
    case = CASES[name]
    pix, pix_v = vision_inputs(case, seed=3)
    with torch.no_grad():
        out = reference.generate(**reference_kwargs(case, pix, pix_v), max_new_tokens=12, do_sample=False)
    expected = out[0, len(case[0]):].tolist()
    embeds, positions, delta = our_prefill(ours, case, pix, pix_v)
    engine = Engine(ours[2], max_batch=2, max_len=512)
    tokens = [t for t, _ in engine.generate(embeds, positions, delta, SamplingParams(max_new_tokens=12), [IM_END, 151643])]
    assert tokens == expected


def test_an_embedding_count_mismatch_is_a_clear_error(ours):
    config, _, lm = ours
    ids = prompt([872], ("image", (1, 8, 8)))
    with pytest.raises(ValueError, match="16 image pad tokens but 12 image embeddings"):
        prefill_inputs(lm, config, ids, torch.zeros(12, 64), None, [(1, 8, 8)])
