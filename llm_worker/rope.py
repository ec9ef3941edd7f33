"""3D M-RoPE position ids (transformers' `get_rope_index`) and the rotary cos/sin they select."""

import itertools

import torch
from torch import Tensor


def rope_index(
    input_ids: list[int],
    image_grid_thw=(),
    video_grid_thw=(),
    second_per_grid_ts=(),
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int = 2,
    tokens_per_second: float = 2,
) -> tuple[Tensor, int]:
    """Positions (3, S) as (t, h, w) ids for one unpadded sequence, and the decode-time delta.

    Text advances all three ids by one per token. Each run of image (video) pad tokens takes the next grid: its
    tokens get (t, h, w) ids offset by the running position, and text after it resumes max(h, w) / merge further
    on. A video's temporal id advances by tokens_per_second * second_per_grid_t per temporal patch (absolute
    time). After prefill, token n (counting from 0) sits at position n + delta."""
    kinds = [1 if i == image_token_id else 2 if i == video_token_id else 0 for i in input_ids]
    grids = {1: iter(image_grid_thw), 2: iter(video_grid_thw)}
    seconds = iter(second_per_grid_ts)
    parts, pos = [], 0
    for kind, run in itertools.groupby(kinds):
        n = len(list(run))
        if kind == 0:
            parts.append(torch.arange(pos, pos + n).expand(3, n))
            pos += n
            continue
        try:
            t, h, w = (int(v) for v in next(grids[kind]))
        except StopIteration:
            name = "image" if kind == 1 else "video"
            raise ValueError(f"the prompt has more runs of {name} pad tokens than {name} grids were given") from None
        gh, gw = h // spatial_merge_size, w // spatial_merge_size
        if n != t * gh * gw:
            raise ValueError(f"a run of {n} vision pad tokens does not match grid {(t, h, w)}: expected {t * gh * gw}")
        interval = tokens_per_second * float(next(seconds)) if kind == 2 else 1
        tt = (torch.arange(t) * torch.tensor(interval, dtype=torch.float32)).long()
        ids = torch.stack(torch.meshgrid(tt, torch.arange(gh), torch.arange(gw), indexing="ij")).reshape(3, -1)
        parts.append(ids + pos)
        pos += max(gh, gw)
    positions = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
    delta = int(positions.max()) + 1 - len(input_ids) if len(input_ids) else 0
    return positions, delta


def mrope_cos_sin(positions: Tensor, head_dim: int, theta: float, mrope_section, dtype) -> tuple[Tensor, Tensor]:
    """positions (3, B, S) → cos, sin (B, S, head_dim): frequency band i takes the t, h or w id by mrope_section."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim))
    freqs = positions[..., None].float() * inv_freq  # (3, B, S, head_dim / 2)
    freqs = torch.cat([part[i % 3] for i, part in enumerate(freqs.split(list(mrope_section), dim=-1))], dim=-1)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, S, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)
