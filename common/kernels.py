"""bfloat16 linear layers on CPUs without bfloat16 arithmetic (AVX2, no AVX512-BF16 or AMX: oneDNN's bfloat16 path
is off there, and PyTorch's fallback converts element by element, 5-8x slower than float32 GEMM for prefill and the
ViT, and far below memory bandwidth for a decode step's matrix-vector products).

BF16Linear, which `adopt` puts in place of a model's bfloat16 nn.Linear layers on such a CPU, computes in float32 and
rounds the result to bfloat16 once, as oneDNN's bfloat16 linear does, so its results equal F.linear's up to the order
of the float32 sums:
- up to DECODE_ROWS rows (decode): a small AVX2/FMA kernel (C, built with the system's gcc at first use in a second
  and cached, called through ctypes) that reads each weight once, widening bfloat16 to float32 in registers (a 16-bit
  shift), two output channels by up to four rows at a time, over torch's thread count with OpenMP;
- more rows (prefill, the ViT): the weight widened to float32 in blocks of output channels, then float32 GEMM.
Elsewhere (CUDA, CPUs with bfloat16 units, other dtypes) layers stay nn.Linear."""

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch
from torch import Tensor, nn

DECODE_ROWS = 8
PREFILL_BLOCK = 4096  # output channels widened to float32 at once (a 2048-wide layer: 32 MiB)
CACHE = Path.home() / ".cache" / "qwen-vl-disagg" / "kernels"
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>

static inline __m256 widen(const uint16_t* p) {  /* 8 bfloat16 -> 8 float32 */
    __m128i h = _mm_loadu_si128((const __m128i*)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* y (B, N) float32 = x (B, K) float32 . w (N, K) bfloat16 ^T, for B <= 4 and K a multiple of 8 */
void bf16_gemv(const float* x, const uint16_t* w, float* y, int64_t B, int64_t N, int64_t K, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n += 2) {
        const int64_t m = n + 1 < N ? n + 1 : n;
        const uint16_t* w0 = w + n * K;
        const uint16_t* w1 = w + m * K;
        __m256 a0[4], a1[4];
        for (int b = 0; b < 4; ++b) a0[b] = a1[b] = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k += 8) {
            __m256 v0 = widen(w0 + k), v1 = widen(w1 + k);
            for (int b = 0; b < 4; ++b) {
                if (b < B) {
                    __m256 xv = _mm256_loadu_ps(x + b * K + k);
                    a0[b] = _mm256_fmadd_ps(v0, xv, a0[b]);
                    a1[b] = _mm256_fmadd_ps(v1, xv, a1[b]);
                }
            }
        }
        for (int b = 0; b < B; ++b) {
            y[b * N + n] = hsum(a0[b]);
            y[b * N + m] = hsum(a1[b]);
        }
    }
}
"""


def cpu_lacks_bf16() -> bool:
    """An x86 CPU with AVX2 and FMA but no bfloat16 units for oneDNN, and a C compiler to build the kernel with."""
    capability = torch._C._cpu._get_cpu_capability()
    return (not torch.ops.mkldnn._is_mkldnn_bf16_supported() and bool(capability.get("avx2"))
            and bool(capability.get("fma3")) and shutil.which("gcc") is not None)


@cache
def _library() -> ctypes.CDLL:
    """The kernel, built once per source and flags into CACHE (a temporary file renamed into place, so workers
    starting together never load half a library)."""
    digest = hashlib.sha256((SOURCE + " ".join(FLAGS)).encode()).hexdigest()[:16]
    path = CACHE / f"bf16_gemv-{digest}.so"
    if not path.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            source = Path(tmp) / "bf16_gemv.c"
            source.write_text(SOURCE)
            subprocess.run(["gcc", *FLAGS, str(source), "-o", str(Path(tmp) / "lib.so")], check=True,
                           capture_output=True)
            os.replace(Path(tmp) / "lib.so", path)
    lib = ctypes.CDLL(str(path))
    lib.bf16_gemv.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.bf16_gemv.restype = None
    return lib


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) for bfloat16 x (..., K) and weight (N, K) on the CPU, in float32, rounded once."""
    rows = x.reshape(-1, x.shape[-1]).float().contiguous()  # (R, K)
    N, K = weight.shape
    if rows.shape[0] <= DECODE_ROWS and weight.is_contiguous():
        y = torch.empty(rows.shape[0], N)
        lib = _library()
        for i in range(0, rows.shape[0], 4):  # the kernel takes four rows at a time
            part = rows[i:i + 4]
            lib.bf16_gemv(part.data_ptr(), weight.data_ptr(), y[i:].data_ptr(), part.shape[0], N, K,
                          torch.get_num_threads())
    else:
        y = torch.cat([rows @ weight[i:i + PREFILL_BLOCK].float().T for i in range(0, N, PREFILL_BLOCK)], dim=1)
    if bias is not None:
        y += bias.float()
    return y.to(torch.bfloat16).view(*x.shape[:-1], N)


class BF16Linear(nn.Linear):
    """nn.Linear whose bfloat16 product runs on `linear` above (a copy cast to another dtype runs as nn.Linear)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.dtype != torch.bfloat16 or x.dtype != torch.bfloat16:
            return super().forward(x)
        return linear(x, self.weight, self.bias)


def adopt(module: nn.Module) -> int:
    """Puts BF16Linear in place of module's bfloat16 CPU nn.Linear layers (K a multiple of 8) when the CPU lacks
    bfloat16 units; returns how many it replaced."""
    if not cpu_lacks_bf16():
        return 0
    replaced = 0
    for sub in module.modules():
        w = getattr(sub, "weight", None)
        if type(sub) is nn.Linear and w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.shape[1] % 8 == 0:
            sub.__class__ = BF16Linear
            replaced += 1
    return replaced
