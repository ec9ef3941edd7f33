"""The Qwen2.5 decoder of Qwen2.5-VL: M-RoPE, grouped-query attention, RMSNorm, SwiGLU, a preallocated KV cache."""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common import kernels
from common.checkpoint import LANGUAGE, Checkpoint, load_module
from common.layers import RMSNorm, rotate_half
from common.config import TextConfig, load_config
from llm_worker.quant import AWQ_PACKED, quantize_linears, quantize_projections
from llm_worker.rope import mrope_cos_sin


class KVCache:
    """Keys and values of `batch` sequences, `max_len` slots each; every sequence writes at its own slots."""

    def __init__(self, config: TextConfig, batch: int, max_len: int, dtype, device, kv_heads: int):
        shape = (batch, kv_heads, max_len, config.head_dim)  # kv_heads: this rank's share under tensor parallelism
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len

    def update(self, layer: int, first_row: int, slots: Tensor, k: Tensor, v: Tensor, length: int):
        """Writes k, v (B, nkv, S, hs) of rows first_row.. at slots (B, S); returns those rows' first `length` slots."""
        B = slots.shape[0]
        rows = torch.arange(first_row, first_row + B, device=slots.device)[:, None]
        self.k[layer][rows, :, slots] = k.transpose(1, 2)  # indexed as (B, S, nkv, hs)
        self.v[layer][rows, :, slots] = v.transpose(1, 2)
        return self.k[layer][first_row : first_row + B, :, :length], self.v[layer][first_row : first_row + B, :, :length]

    def move_row(self, src: int, dst: int) -> None:
        for cache in (*self.k, *self.v):
            cache[dst] = cache[src]


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """One query per row: q (B, nh, 1, hs), k and v (B, nkv, L, hs), mask (B, 1, 1, L) or None → (B, nh, 1, hs).
    Two batched matmuls with the query heads of a KV head side by side; for a single query they beat the fused
    SDPA kernels (CPU, bfloat16: 2x at batch 8 here, 9x on the 3B shape). Like those kernels it works in float32
    whatever the cache's dtype (scores rounded to bfloat16 flip near-tied greedy tokens)."""
    B, nh, _, hs = q.shape
    n_kv = k.shape[1]
    scores = (q.view(B, n_kv, nh // n_kv, hs).float() @ k.float().transpose(-1, -2)) * hs**-0.5  # (B, nkv, nh/nkv, L)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype).view(B, nh, 1, hs)


class Attention(nn.Module):
    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.widths = [self.n_head * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim]
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.widths))  # q_proj, k_proj, v_proj stacked
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, first_row: int, slots: Tensor, attn: dict):
        B, S, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.widths, -1)
        q = q.view(B, S, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, S, hs)
        k = k.view(B, S, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, S, hs)
        v = v.view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, S, hs)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k, v = cache.update(self.layer, first_row, slots, k, v, attn["length"])  # (B, nkv, L, hs)
        if S == 1:
            out = decode_attention(q, k, v, attn["mask"])
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn["mask"], is_causal=attn["causal"], enable_gqa=True)  # (B, nh, S, hs)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.widths = [config.intermediate_size, config.intermediate_size]
        self.gate_up_proj = nn.Linear(config.hidden_size, sum(self.widths), bias=False)  # gate_proj, up_proj stacked
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).split(self.widths, -1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, first_row: int, slots: Tensor, attn: dict):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, first_row, slots, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask(slots: Tensor, length: int) -> dict:
    """Which cache slots each token sees: its own sequence's, up to and including its own slot. The two common
    cases need no mask tensor (so SDPA takes its fused kernels): one prompt prefilled from slot 0 (causal), and a
    decode step in which every row is at the end of what it attends to."""
    B, S = slots.shape
    if B == 1 and S == length:
        return {"length": length, "mask": None, "causal": True}
    if S == 1 and bool((slots == length - 1).all()):
        return {"length": length, "mask": None, "causal": False}
    mask = torch.arange(length, device=slots.device) <= slots[..., None]  # (B, S, L)
    return {"length": length, "mask": mask[:, None], "causal": False}  # mask (B, 1, S, L)


class Body(nn.Module):
    """`model.*` of the checkpoint: embeddings, layers, final norm."""

    def __init__(self, config: TextConfig):
        super().__init__()
        # built uninitialized: nn.Embedding's normal_ on the meta device imports torch._dynamo (2.6 s on a quiet core)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LanguageModel(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.model = Body(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch, max_len, self.dtype, self.device, self.model.layers[0].self_attn.n_kv)

    def embed(self, ids: Tensor) -> Tensor:
        return self.model.embed_tokens(ids)

    def forward(
        self, embeds: Tensor, positions: Tensor, slots: Tensor, cache: KVCache, logits_at: Tensor | None = None,
        first_row: int = 0,
    ) -> Tensor:
        """embeds (B, S, C), M-RoPE positions (3, B, S), cache slots (B, S) of cache rows first_row.. → float32
        logits (B, S, vocab), or (B, vocab) at token logits_at[b] of each row when given.

        A token attends to the cache slots of its own sequence up to and including its own slot."""
        length = int(slots.max()) + 1
        attn = attention_mask(slots, length)
        cos, sin = mrope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, self.config.mrope_section, embeds.dtype)
        x = embeds
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, first_row, slots, attn)
        if logits_at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logits_at]  # (B, C)
        return self.lm_head(self.model.norm(x)).float()

    @classmethod
    def from_pretrained(
        cls, model_dir, dtype: torch.dtype = torch.bfloat16, device="cpu", quantization: str | None = None,
        shard=None,
    ) -> "LanguageModel":
        """Reads only the `model.` and `lm_head.` tensors of the checkpoint, mapping those it uses as stored
        (common.checkpoint); ties lm_head when the config says so. quantization int8 or int4 quantizes the decoder's
        projections at load, one stacked matrix at a time; an AWQ checkpoint loads as int4."""
        full_config = load_config(model_dir)
        config = full_config.text
        with torch.device("meta"):
            model = cls(config)
        tensors = read_stacked(Checkpoint(model_dir, LANGUAGE), model, dtype, device)
        if config.tie_word_embeddings and "model.embed_tokens.weight" in tensors:
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
        quantize_projections(tensors, quantization, full_config.quantization_config, dtype, Path(model_dir))
        if shard is not None:  # tensor parallelism: this rank's slices, its modules resized (llm_worker.parallel)
            shard(model, tensors)
        quantize_linears(model.model.layers, tensors, "model.layers.")
        load_module(model, tensors, "", Path(model_dir))
        kernels.adopt(model)  # bfloat16 on a CPU without bfloat16 units: the AVX2 kernel, float32 GEMM for prefill
        return model.eval()


STACKED = {"self_attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")), "mlp": ("gate_up_proj", ("gate_proj", "up_proj"))}


def read_stacked(checkpoint: Checkpoint, model: LanguageModel, dtype: torch.dtype, device) -> dict[str, Tensor]:
    """The checkpoint's tensors by published name (Checkpoint.get), with each layer's q, k, v projections (and gate,
    up) stacked into one matrix, as vLLM does: one GEMM instead of three (two), which at decode costs about the same
    whatever its width. A stacked weight is mapped when its parts lie back to back in the file, else read into one
    new matrix (Checkpoint.concat). An AWQ checkpoint's qweight, qzeros and scales hold the output channels on dim 1
    and are stacked along it. Errors name the checkpoint's own tensors."""
    tensors, parts_read = {}, set()
    for i, layer in enumerate(model.model.layers):
        for owner, (stacked, parts) in STACKED.items():
            widths, prefix = layer.get_submodule(owner).widths, f"model.layers.{i}.{owner}."
            shapes = {kind: param.shape[1:] for kind, param in layer.get_submodule(f"{owner}.{stacked}").named_parameters()}
            awq = f"{prefix}{parts[0]}.qweight" in checkpoint
            if awq:
                del shapes["weight"]
            for kind in [*shapes, *(AWQ_PACKED if awq else ())]:
                names = [f"{prefix}{part}.{kind}" for part in parts]
                if kind in shapes:
                    expected = [(width, *shapes[kind]) for width in widths]
                else:  # AWQ (in, out / 8) and (in / group, out / 8 or out): the parts' widths scale dim 1
                    rows, columns = checkpoint[names[0]].shape
                    expected = [(rows, columns * width // widths[0]) for width in widths]
                for name, shape in zip(names, expected):
                    checkpoint.check(name, shape)
                tensors[f"{prefix}{stacked}.{kind}"] = (
                    checkpoint.concat(names, dtype, device) if kind in shapes
                    else torch.cat([checkpoint.get(name, dtype, device) for name in names], 1))
                parts_read.update(names)
    tensors.update({name: checkpoint.get(name, dtype, device) for name in checkpoint.stored if name not in parts_read})
    return tensors
