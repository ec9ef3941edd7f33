"""Weight-only quantized linears of the LLM half: int8 (one scale per output channel) and int4 (a scale and a zero per
group of input channels), quantized at load from a float checkpoint or repacked from an AWQ one, on the matmul kernels
PyTorch ships (`_weight_int8pack_mm`; `_weight_int4pack_mm_for_cpu` on CPU, `_weight_int4pack_mm` on CUDA).

Loading goes in three steps (llm_worker.model.LanguageModel.from_pretrained): `read_stacked` stacks q/k/v and
gate/up as they are read (float weights, or an AWQ checkpoint's packed tensors); `quantize_projections` turns each
decoder projection, stacked or not, into codes (`weight`), `scales` and, for int4, `zeros`, one matrix at a time, the
float one freed (its mapped pages unmapped) before the next is read; `quantize_linears` packs the codes for the
kernel and swaps in the quantized modules. Scales are per output channel and groups run along the input, so
quantizing a stacked matrix gives what stacking its quantized parts would. The embeddings, norms and lm_head stay
float, as in Qwen's AWQ checkpoints.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common import kernels

QUANTIZATIONS = ("int8", "int4")
QUANTIZED_KINDS = ("scales", "zeros")  # what a quantized projection holds besides its codes (`weight`) and bias
AWQ_PACKED = ("qweight", "qzeros", "scales")  # an AWQ projection's tensors besides its bias; output channels on dim 1
GROUP_SIZE = 128  # int4: input channels sharing a scale and a zero (AWQ's and torchao's default)
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernels take
INT4_ROWS = 16  # the CPU int4 kernel packs output channels 16 at a time (the CUDA one 8)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ GEMM: nibble i of an int32 holds output channel AWQ_ORDER[i] of its 8
AWQ_CONFIG = {"quant_method": "awq", "bits": 4, "zero_point": True, "version": "gemm"}  # the one AWQ layout read
ROWS_AT_ONCE = 2048  # quantizing and packing go this many output channels at a time: float32 temporaries of a few
                     # rows, not of the whole matrix, in few enough ops that thread stalls on a busy machine stay rare
                     # (256 rows at a time loaded int4 2x slower here with other processes running)


def row_blocks(n: int):
    return (slice(start, start + ROWS_AT_ONCE) for start in range(0, n, ROWS_AT_ONCE))


def quantize_int8(w: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """w (N, K) → int8 codes (N, K) and scales (N,) in `dtype`: w ≈ codes * scales[:, None], symmetric over each
    output channel's largest magnitude. Codes are rounded against the scales as stored, so the kernel's weight is
    exactly codes * scales."""
    scales = (w.abs().amax(1).float() / 127).to(dtype).clamp(min=torch.finfo(dtype).tiny)  # all-zero row: codes 0
    inverse = 1 / scales.float()[:, None]
    codes = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    for rows in row_blocks(w.shape[0]):
        codes[rows] = torch.mul(w[rows], inverse[rows]).round_().clamp_(-127, 127)  # float32 whatever w's dtype
    return codes, scales


def quantize_int4(w: Tensor, group_size: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """w (N, K) → codes (N, K) uint8 in 0..15, scales and zeros (N, K / group_size) in `dtype`, asymmetric over each
    group's min..max, in the int4 kernels' convention: w ≈ (codes - 8) * scale + zero (the zero is w at code 8)."""
    N, K = w.shape
    lo, hi = (bound.float() for bound in torch.aminmax(w.view(N, K // group_size, group_size), dim=-1))
    scales = ((hi - lo) / 15).to(dtype).clamp(min=torch.finfo(dtype).tiny)
    zeros = (lo + 8 * scales.float()).to(dtype)
    inverse = 1 / scales.float()[..., None]
    offset = 8 - zeros.float()[..., None] * inverse  # code = (w - zero) / scale + 8 = w * inverse + offset
    codes = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    for rows in row_blocks(N):
        groups = torch.addcmul(offset[rows], w[rows].view(-1, K // group_size, group_size), inverse[rows])  # float32
        codes[rows] = groups.round_().clamp_(0, 15).view(-1, K)
    return codes, scales, zeros


def unpack_awq(qweight: Tensor, qzeros: Tensor, scales: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """AWQ GEMM tensors → codes (N, K) uint8, scales and zeros (N, K / group) in `dtype`, in the int4 kernels'
    convention. qweight (K, N/8) and qzeros (K/group, N/8) are int32, each holding 8 4-bit values of consecutive
    output channels in AWQ_ORDER; scales (K/group, N); AWQ's weight is (code - zero) * scale, which is
    (code - 8) * scale + (8 - zero) * scale."""
    codes, awq_zeros = unpack_awq_int32(qweight).T, unpack_awq_int32(qzeros).T  # (N, K), (N, K/group)
    scales = scales.T.to(dtype)
    zeros = ((8 - awq_zeros.float()) * scales.float()).to(dtype)
    return codes.to(torch.uint8).contiguous(), scales.contiguous(), zeros.contiguous()


def unpack_awq_int32(packed: Tensor) -> Tensor:
    """(R, C) int32 → (R, 8C) 4-bit values: output channel j of each 8 sits in nibble AWQ_ORDER.index(j)."""
    shifts = torch.tensor([4 * AWQ_ORDER.index(j) for j in range(8)], dtype=torch.int32, device=packed.device)
    return ((packed[..., None] >> shifts) & 15).view(packed.shape[0], -1)  # (R, C, 8) → (R, 8C)


def awq_group_size(quantization_config: dict, source) -> int:
    """The group size of a checkpoint's quantization_config, which must describe AWQ's 4-bit GEMM layout."""
    wrong = {key: quantization_config.get(key) for key, value in AWQ_CONFIG.items()
             if str(quantization_config.get(key)).lower() != str(value).lower()}
    group_size = quantization_config.get("group_size")
    if wrong or group_size not in INT4_GROUP_SIZES:
        raise ValueError(
            f"{source}: config.json quantization_config {quantization_config} is not one this loader reads: it reads "
            f"AWQ checkpoints with {AWQ_CONFIG} and group_size one of {list(INT4_GROUP_SIZES)}"
            + (f" (got {wrong})" if wrong else f" (got group_size {group_size!r})")
            + "; a float checkpoint can be quantized at load with --quantization int8 or int4")
    return group_size


def int4_group_size(name: str, in_features: int) -> int:
    """GROUP_SIZE input channels, or the whole row when it is one of the smaller sizes the kernels take."""
    group_size = min(GROUP_SIZE, in_features)
    if group_size not in INT4_GROUP_SIZES or in_features % group_size:
        raise ValueError(f"int4 quantizes groups of {GROUP_SIZE} input channels (or a whole row of 32 or 64): tensor "
                         f"{name!r} has {in_features}; use --quantization int8 for this checkpoint")
    return group_size


def quantize_projections(tensors: dict[str, Tensor], quantization: str | None, quantization_config: dict | None,
                         dtype: torch.dtype, source) -> None:
    """Replaces each decoder projection's `weight` in `tensors` by codes, `scales` and (int4) `zeros`: a float weight
    quantized as `quantization` says (int8, int4 or None: left float), an AWQ checkpoint's qweight/qzeros/scales
    unpacked. An AWQ checkpoint is int4 already: --quantization int8 on it is refused."""
    if quantization not in (None, *QUANTIZATIONS):
        raise ValueError(f"quantization must be one of {list(QUANTIZATIONS)} or none, got {quantization!r}")
    if quantization_config is not None:
        group_size = awq_group_size(quantization_config, source)
        if quantization == "int8":
            raise ValueError(f"{source} is an AWQ checkpoint, which loads as int4: --quantization int8 needs a float "
                             "checkpoint (leave --quantization out, or give int4)")
        for name in [n for n in tensors if n.startswith("model.layers.") and n.endswith("_proj.qweight")]:
            prefix = name[: -len("qweight")]
            packed = [tensors.pop(prefix + kind) for kind in ("qweight", "qzeros", "scales")]
            if packed[1].shape[0] * group_size != packed[0].shape[0] or packed[2].shape[0] != packed[1].shape[0]:
                raise ValueError(f"{source}: tensor {name!r} has {packed[0].shape[0]} input channels, but its qzeros and "
                                 f"scales hold {packed[1].shape[0]} and {packed[2].shape[0]} groups of {group_size}")
            tensors[prefix + "weight"], tensors[prefix + "scales"], tensors[prefix + "zeros"] = unpack_awq(*packed, dtype)
        return
    if quantization is None:
        return
    for name in [n for n in tensors if n.startswith("model.layers.") and n.endswith("_proj.weight")]:
        prefix, w = name[: -len("weight")], tensors.pop(name)
        if quantization == "int8":
            tensors[name], tensors[prefix + "scales"] = quantize_int8(w, dtype)
        else:
            group_size = int4_group_size(name, w.shape[1])
            tensors[name], tensors[prefix + "scales"], tensors[prefix + "zeros"] = quantize_int4(w, group_size, dtype)


def quantize_linears(layers: nn.Module, tensors: dict[str, Tensor], prefix: str) -> None:
    """Swaps each nn.Linear of `layers` whose tensors are codes (a `scales` beside the weight) for the kernel's module
    built from them; their entries in `tensors` become the module's (packed) state, for load_module to check."""
    for name, module in list(layers.named_modules()):
        stored = f"{prefix}{name}."
        if isinstance(module, nn.Linear) and stored + "scales" in tensors:
            codes, scales = tensors.pop(stored + "weight"), tensors.pop(stored + "scales")
            bias = tensors.get(stored + "bias")
            if stored + "zeros" in tensors:
                quantized = Int4Linear.from_codes(codes, scales, tensors.pop(stored + "zeros"), bias, stored + "weight")
            else:
                quantized = Int8Linear(codes, scales, bias)
            layers.set_submodule(name, quantized)
            tensors.update({stored + key: value for key, value in quantized.state_dict().items()})


class Int8Linear(nn.Module):
    """y = x @ (weight * scales[:, None]).T + bias with weight int8 (N, K): `_weight_int8pack_mm` (CPU and CUDA) reads
    one byte a weight. A bfloat16 prefill on a CPU with bfloat16 units runs instead on the weight dequantized to
    bfloat16 (each code times its scale rounded once) a block of ROWS_AT_ONCE output channels at a time, through
    oneDNN's bfloat16 GEMM: 4x faster than the int8 kernel for 512 rows on an AVX-512-BF16 CPU."""

    def __init__(self, weight: Tensor, scales: Tensor, bias: Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # (N, K) int8
        self.register_buffer("scales", scales)  # (N,) in the activations' dtype
        self.register_buffer("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        if (rows.shape[0] > kernels.DECODE_ROWS and x.dtype == torch.bfloat16 and x.device.type == "cpu"
                and kernels.bf16_units()):
            # codes are exact in bfloat16 (|code| <= 127), and a bfloat16 product is the float32 one rounded once
            y = torch.cat([F.linear(rows, self.weight[block].to(torch.bfloat16) * self.scales[block, None])
                           for block in row_blocks(self.out_features)], 1)
        else:
            y = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), self.weight, self.scales)
        y = y if self.bias is None else y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """y = x @ W.T + bias with W[n, k] = (code - 8) * scale + zero of k's group: half a byte a weight, packed for the
    device's int4 kernel (`_weight_int4pack_mm_for_cpu` on CPU, `_weight_int4pack_mm` on CUDA)."""

    def __init__(self, weight: Tensor, scales_and_zeros: Tensor, bias: Tensor | None, in_features: int, group_size: int):
        super().__init__()
        self.in_features, self.group_size = in_features, group_size
        self.out_features = scales_and_zeros.shape[1]
        self.register_buffer("weight", weight)  # packed: CPU (N, K/2) uint8, CUDA (N/8, K/(16 tiles), 32, tiles/2) int32
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # (K/group, N, 2) in the activations' dtype
        self.register_buffer("bias", bias)

    @classmethod
    def from_codes(cls, codes: Tensor, scales: Tensor, zeros: Tensor, bias: Tensor | None, name: str) -> "Int4Linear":
        """codes (N, K) in 0..15, scales and zeros (N, K/group) → the module, packed for the codes' device."""
        N, K = codes.shape
        group_size = K // scales.shape[1]
        if N % INT4_ROWS:
            raise ValueError(f"the int4 kernel packs output channels {INT4_ROWS} at a time: tensor {name!r} has {N}; "
                             "use --quantization int8 for this checkpoint")
        inner_k_tiles = next(tiles for tiles in (8, 4, 2) if K % (16 * tiles) == 0)  # K is a multiple of 32
        if codes.device.type == "cpu":  # packed 256 rows at a time, which packs each row as the whole matrix would
            pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu
            weight = torch.cat([pack(codes[rows].to(torch.int32), inner_k_tiles) for rows in row_blocks(N)])
        else:
            if scales.dtype != torch.bfloat16:
                raise ValueError(f"int4 on {codes.device.type} runs in bfloat16, not {scales.dtype} (--dtype bfloat16)")
            pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)  # (N, K/2), even k in the high nibble
            weight = torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles)
        scales_and_zeros = torch.stack([scales, zeros], -1).transpose(0, 1).contiguous()  # (K/group, N, 2)
        return cls(weight, scales_and_zeros, bias, K, group_size)

    def forward(self, x: Tensor) -> Tensor:
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu if x.device.type == "cpu" else torch.ops.aten._weight_int4pack_mm
        y = mm(x.reshape(-1, self.in_features).contiguous(), self.weight, self.group_size, self.scales_and_zeros)
        y = y if self.bias is None else y + self.bias
        return y.view(*x.shape[:-1], self.out_features)
