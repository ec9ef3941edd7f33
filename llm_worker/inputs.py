"""Turns a prompt's token ids and the visual worker's embeddings into prefill inputs: each media item's pad becomes
its grid's count of pads, the vision embeddings take the pads' places, and the M-RoPE ids are built."""

import torch
from torch import Tensor

from common.config import ModelConfig
from common.tokenizer import IMAGE_PAD, VIDEO_PAD
from llm_worker.rope import rope_index


def expand_vision_pads(ids: list[int], image_grid_thw, video_grid_thw, image_pad_id: int, video_pad_id: int,
                       merge_size: int = 2) -> list[int]:
    """Each image (video) pad becomes t·h·w / merge_size² copies, one grid per pad, in order."""
    lengths = {}  # pad id -> iterator over the token count of each of its grids, in order
    for pad_id, name, grids in ((image_pad_id, IMAGE_PAD, image_grid_thw), (video_pad_id, VIDEO_PAD, video_grid_thw)):
        grids = [] if grids is None else [[int(x) for x in thw] for thw in grids]
        if (n_pads := ids.count(pad_id)) != len(grids):
            raise ValueError(f"{n_pads} {name} tokens in the prompt but {len(grids)} grids given")
        lengths[pad_id] = iter([t * h * w // merge_size**2 for t, h, w in grids])
    out = []
    for i in ids:
        out.extend([i] * next(lengths[i]) if i in lengths else [i])
    return out


def splice_vision(embeds: Tensor, ids: Tensor, token_id: int, vision: Tensor | None, what: str) -> Tensor:
    """Places vision embeddings (n, C) at the n positions of `token_id` in ids (S,); embeds is (S, C)."""
    at = ids == token_id
    n_pads, n_embeds = int(at.sum()), 0 if vision is None else vision.shape[0]
    if n_pads != n_embeds:
        raise ValueError(f"the prompt has {n_pads} {what} pad tokens but {n_embeds} {what} embeddings arrived")
    if n_pads:
        embeds = embeds.clone()
        embeds[at] = vision.to(embeds.device, embeds.dtype)
    return embeds


def prefill_inputs(
    model, config: ModelConfig, ids: list[int], image_embeds=None, video_embeds=None,
    image_grid_thw=(), video_grid_thw=(), second_per_grid_ts=(),
) -> tuple[Tensor, Tensor, int]:
    """ids with every pad expanded → embeds (S, C), positions (3, S), rope delta."""
    ids_t = torch.tensor(ids, device=model.device)
    with torch.inference_mode():
        embeds = model.embed(ids_t)
    embeds = splice_vision(embeds, ids_t, config.image_token_id, image_embeds, "image")
    embeds = splice_vision(embeds, ids_t, config.video_token_id, video_embeds, "video")
    positions, delta = rope_index(
        ids, image_grid_thw, video_grid_thw, second_per_grid_ts,
        image_token_id=config.image_token_id, video_token_id=config.video_token_id,
        spatial_merge_size=config.vision.spatial_merge_size, tokens_per_second=config.vision.tokens_per_second,
    )
    return embeds, positions.to(model.device), delta
