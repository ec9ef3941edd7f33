"""The Qwen2.5-VL vision transformer: patch embed, 2D rotary, window/full attention blocks, 2x2 patch merger.

Everything that depends on the image sizes (rotary cos/sin, the window permutation, which tokens attend to which)
is computed on the host by `make_layout` and passed in, as the seed deployment did, so that `forward` itself has
no Python loops over images or windows and can be exported for a fixed patch budget.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common import kernels
from common.checkpoint import VISUAL, load_module, read_tensors
from common.layers import RMSNorm, rotate_half
from common.config import VisionConfig, load_config


@dataclass
class Segments:
    """Groups of tokens that attend to each other (windows, or whole images), batched by length, so attention
    needs neither padding nor masks: a handful of batched calls per layer, whatever the number of windows.

    gathers[g][b, j] is the sequence index of the j-th token of the b-th group of length L_g; scatter[i] is where
    token i sits in the concatenation of the flattened gathers."""

    gathers: list[Tensor]  # [(B_g, L_g) int64, ...]
    scatter: Tensor  # (N,) int64

    @classmethod
    def from_lengths(cls, lengths: list[int]) -> "Segments":
        """Contiguous groups of the given lengths, in sequence order."""
        lengths_t = torch.tensor(lengths)
        starts = torch.cumsum(lengths_t, 0) - lengths_t
        gathers = [starts[lengths_t == n][:, None] + torch.arange(n) for n in sorted(set(lengths))]
        scatter = torch.argsort(torch.cat([g.flatten() for g in gathers]))
        return cls(gathers, scatter)

    def to(self, device) -> "Segments":
        return Segments([g.to(device) for g in self.gathers], self.scatter.to(device))


@dataclass
class VisionLayout:
    """Host-side inputs of one ViT call. Tokens inside the ViT are in window order (grouped by attention window,
    four patches of each 2x2 merge group adjacent); `merged_order[k]` is the merged token (in image order) at
    window-order position k."""

    cos: Tensor  # (N, head_dim) float32, window order
    sin: Tensor  # (N, head_dim)
    merged_order: Tensor  # (N / 4,) int64
    windows: Segments
    images: Segments  # full-attention groups: one per image or video frame
    num_patches: int  # real patches; the rest up to N is budget padding

    def to(self, device) -> "VisionLayout":
        return VisionLayout(
            self.cos.to(device), self.sin.to(device), self.merged_order.to(device),
            self.windows.to(device), self.images.to(device), self.num_patches,
        )


# layouts are forward inputs: registered as pytrees so that torch.export (the way to TVM) takes them
torch.export.register_dataclass(Segments, serialized_type_name="visual_worker.vision.Segments")
torch.export.register_dataclass(VisionLayout, serialized_type_name="visual_worker.vision.VisionLayout")


def make_layout(config: VisionConfig, grid_thw: list[tuple[int, int, int]], pad_to: int | None = None) -> VisionLayout:
    """Layout for images/videos of the given patch grids; `pad_to` pads to a fixed patch budget (multiple of 16)."""
    m = config.spatial_merge_size
    unit = m * m
    win = config.window_size // m // config.patch_size  # merged tokens per window side (4)
    orders, window_lengths, image_lengths, rows, cols = [], [], [], [], []
    offset = 0
    for t, h, w in grid_thw:
        gh, gw = h // m, w // m
        # merged-token ids of this image, tiled into win x win windows; edge windows are smaller, not padded
        ids = torch.arange(t * gh * gw).reshape(t, gh, gw)
        nh, nw = -(-gh // win), -(-gw // win)
        padded = F.pad(ids, (0, nw * win - gw, 0, nh * win - gh), value=-1)
        padded = padded.reshape(t, nh, win, nw, win).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, win * win)
        counts = (padded >= 0).sum(1)
        orders.append(padded[padded >= 0] + offset)
        window_lengths += [int(c) * unit for c in counts if c > 0]
        image_lengths += [h * w] * t  # full attention is per frame
        # patch (row, col) in merge-block order: for each merged token, its m x m patches row-major
        r = torch.arange(h).reshape(gh, m, 1, 1).expand(gh, m, gw, m).permute(0, 2, 1, 3).reshape(-1)
        c = torch.arange(w).reshape(1, 1, gw, m).expand(gh, m, gw, m).permute(0, 2, 1, 3).reshape(-1)
        rows.append(r.repeat(t))
        cols.append(c.repeat(t))
        offset += t * gh * gw
    num_patches = offset * unit
    merged_order = torch.cat(orders)
    patch_order = (merged_order[:, None] * unit + torch.arange(unit)).reshape(-1)
    rows, cols = torch.cat(rows)[patch_order], torch.cat(cols)[patch_order]
    if pad_to is not None:
        if pad_to % 16 or pad_to < num_patches:
            raise ValueError(f"patch budget {pad_to} must be a multiple of 16 and at least {num_patches} patches")
        extra = pad_to - num_patches
        # padding patches form their own groups, so every group has a real key and nothing leaks into the image
        merged_order = torch.cat([merged_order, torch.arange(offset, pad_to // unit)])
        window_lengths += [64] * (extra // 64) + ([extra % 64] if extra % 64 else [])
        image_lengths += [extra] if extra else []
        rows, cols = F.pad(rows, (0, extra)), F.pad(cols, (0, extra))
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim // 2, 2, dtype=torch.float) / (config.head_dim // 2)))
    freqs = torch.cat([rows[:, None] * inv_freq, cols[:, None] * inv_freq], dim=-1)  # (N, head_dim / 2)
    freqs = torch.cat([freqs, freqs], dim=-1)  # (N, head_dim)
    return VisionLayout(
        freqs.cos(), freqs.sin(), merged_order,
        Segments.from_lengths(window_lengths), Segments.from_lengths(image_lengths), num_patches,
    )


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, groups: Segments) -> Tensor:
        N, C = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, -1).unbind(1)  # (N, nh, hs) each
        cos, sin = cos[:, None, :], sin[:, None, :]
        q, k = q.float(), k.float()
        q = (q * cos + rotate_half(q) * sin).to(x.dtype)
        k = (k * cos + rotate_half(k) * sin).to(x.dtype)
        outs = []
        for gather in groups.gathers:  # one call per distinct group length
            qg, kg, vg = (t[gather].transpose(1, 2) for t in (q, k, v))  # (B_g, nh, L_g, hs)
            outs.append(F.scaled_dot_product_attention(qg, kg, vg).transpose(1, 2).reshape(-1, C))
        return self.proj(torch.cat(outs)[groups.scatter])  # (N, C), back in sequence order


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm2 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, groups: Segments) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, groups)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        # a Conv3d whose stride equals its kernel over one patch each is a matmul; kept as Conv3d for the tensor name
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel, stride=kernel, bias=False)

    def forward(self, pixels: Tensor) -> Tensor:  # (N, 1176) -> (N, C)
        return F.linear(pixels.to(self.proj.weight.dtype), self.proj.weight.flatten(1))


class PatchMerger(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.merged_dim = config.hidden_size * config.spatial_merge_size**2
        self.ln_q = RMSNorm(config.hidden_size, 1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(self.merged_dim, self.merged_dim), nn.GELU(), nn.Linear(self.merged_dim, config.out_hidden_size)
        )

    def forward(self, x: Tensor) -> Tensor:  # (N, C) -> (N / 4, out_hidden)
        return self.mlp(self.ln_q(x).view(-1, self.merged_dim))


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)

    def forward(self, pixels: Tensor, layout: VisionLayout) -> Tensor:
        """pixels (N, 1176) in image order → image_embeds (N / 4, out_hidden) in image order."""
        unit = self.config.spatial_merge_size**2
        x = self.patch_embed(pixels)  # (N, C)
        N, C = x.shape
        x = x.view(N // unit, unit * C)[layout.merged_order].view(N, C)  # window order
        for i, block in enumerate(self.blocks):
            groups = layout.images if i in self.config.fullatt_block_indexes else layout.windows
            x = block(x, layout.cos, layout.sin, groups)
        merged = self.merger(x)  # (N / 4, out_hidden), window order
        return torch.empty_like(merged).index_copy_(0, layout.merged_order, merged)

    @torch.inference_mode()
    def embed(self, pixels: Tensor, grid_thw, pad_to: int | None = None) -> Tensor:
        """Image embeddings for pixel_values and their grids (one call for several images)."""
        device = self.patch_embed.proj.weight.device
        grid = [tuple(int(v) for v in g) for g in grid_thw]
        layout = make_layout(self.config, grid, pad_to).to(device)
        pixels = torch.as_tensor(pixels).to(device)
        if pad_to is not None:
            pixels = F.pad(pixels, (0, 0, 0, pad_to - pixels.shape[0]))
        return self(pixels, layout)[: layout.num_patches // self.config.spatial_merge_size**2]

    @classmethod
    def from_pretrained(cls, model_dir, dtype: torch.dtype = torch.bfloat16, device="cpu") -> "VisionTransformer":
        """Reads only the `visual.` tensors of the checkpoint."""
        config = load_config(model_dir).vision
        with torch.device("meta"):
            model = cls(config)
        load_module(model, read_tensors(model_dir, VISUAL, dtype, device), VISUAL, Path(model_dir))
        kernels.adopt(model)  # bfloat16 on a CPU without bfloat16 units: float32 GEMM on widened weights
        return model.eval()
