"""bfloat16 linear layers on x86 CPUs: a decode kernel of our own, and float32 GEMM for prefill where the CPU has
no bfloat16 arithmetic.

Measured on both kinds of CPU this project met (README "bfloat16 kernels"): a decode step's matrix-vector products
run below memory bandwidth in PyTorch's bfloat16 linear, by 1.2-1.5x on an AVX-512-BF16 CPU (oneDNN) and 2-3x on an
AVX2-only one, where oneDNN's bfloat16 path is off and PyTorch's fallback converts element by element (and is 5-8x
slower than float32 GEMM for prefill and the ViT).

BF16Linear, which `adopt` puts in place of a model's bfloat16 nn.Linear layers on an x86 CPU with AVX2 and FMA,
computes in float32 and rounds the result to bfloat16 once, as oneDNN's bfloat16 linear does, so its results equal
F.linear's up to the order of the float32 sums:
- up to DECODE_ROWS rows (decode): a small C kernel (AVX-512 where the CPU has it, else AVX2/FMA; built with the
  system's gcc at first use in a second and cached, called through ctypes) that reads each weight once, widening
  bfloat16 to float32 in registers (a 16-bit shift), two output channels by up to DECODE_ROWS rows at a time, over
  torch's thread count with OpenMP;
- more rows (prefill, the ViT): F.linear where oneDNN has bfloat16 arithmetic; elsewhere the weight widened to
  float32 in blocks of output channels, then float32 GEMM.
Elsewhere (CUDA, other CPUs, other dtypes) layers stay nn.Linear."""

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DECODE_ROWS = 8
PREFILL_BLOCK = 4096  # output channels widened to float32 at once (a 2048-wide layer: 32 MiB)
CACHE = Path.home() / ".cache" / "qwen-vl-disagg" / "kernels"
FLAGS = ["-O3", "-mfma", "-fopenmp", "-shared", "-fPIC"]
ISA_FLAGS = {"avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl"], "avx2": ["-mavx2"]}

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>

#ifdef __AVX512F__
#define ROWS 8
#define LANES 16
typedef __m512 vec;
static inline vec widen(const uint16_t* p, int64_t n) {  /* n <= 16 bfloat16 -> float32, zeros past n */
    __m256i h = _mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline vec load(const float* p, int64_t n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
static inline vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec zero(void) { return _mm512_setzero_ps(); }
static inline vec set1(float f) { return _mm512_set1_ps(f); }
static inline float hsum(vec v) { return _mm512_reduce_add_ps(v); }
static inline vec int8s(const int8_t* p, int64_t n) {  /* n <= 16 int8 -> float32, zeros past n */
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8((__mmask16)((1u << n) - 1), p)));
}
static inline void nibbles(const uint8_t* p, vec* lo, vec* hi) {  /* 16 bytes -> their low and high nibbles */
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
    *lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
    *hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
}
#else
#define ROWS 4  /* 2 x 4 accumulators, 2 weights and x: 11 of the 16 registers */
#define LANES 8
typedef __m256 vec;
static inline vec widen(const uint16_t* p, int64_t n) {  /* n == 8 (K is a multiple of 8 here) */
    __m128i h = _mm_loadu_si128((const __m128i*)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline vec load(const float* p, int64_t n) { return _mm256_loadu_ps(p); }
static inline vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec zero(void) { return _mm256_setzero_ps(); }
static inline vec set1(float f) { return _mm256_set1_ps(f); }
static inline vec int8s(const int8_t* p, int64_t n) {  /* n == 8 int8 -> float32 */
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
static inline void nibbles(const uint8_t* p, vec* lo, vec* hi) {  /* 8 bytes -> their low and high nibbles */
    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
    *lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
    *hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
}
static inline float hsum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
#endif

int rows(void) { return ROWS; }

/* y (B, N) float32 = x (B, K) float32 . w (N, K) bfloat16 ^T, for B <= ROWS and K a multiple of 8 */
void bf16_gemv(const float* x, const uint16_t* w, float* y, int64_t B, int64_t N, int64_t K, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n += 2) {
        const int64_t m = n + 1 < N ? n + 1 : n;
        const uint16_t* w0 = w + n * K;
        const uint16_t* w1 = w + m * K;
        vec a0[ROWS], a1[ROWS];
        for (int b = 0; b < ROWS; ++b) a0[b] = a1[b] = zero();
        for (int64_t k = 0; k < K; k += LANES) {
            const int64_t left = K - k < LANES ? K - k : LANES;
            vec v0 = widen(w0 + k, left), v1 = widen(w1 + k, left);
            for (int b = 0; b < ROWS; ++b) {
                if (b < B) {
                    vec xv = load(x + b * K + k, left);
                    a0[b] = fma(v0, xv, a0[b]);
                    a1[b] = fma(v1, xv, a1[b]);
                }
            }
        }
        for (int b = 0; b < B; ++b) {
            y[b * N + n] = hsum(a0[b]);
            y[b * N + m] = hsum(a1[b]);
        }
    }
}

/* y (B, N) float32 = x (B, K) float32 . (w (N, K) int8 * scales (N,) float32)^T, B <= ROWS, K a multiple of 8 */
void int8_gemv(const float* x, const int8_t* w, const float* scales, float* y, int64_t B, int64_t N, int64_t K,
               int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const int8_t* row = w + n * K;
        vec acc[ROWS];
        for (int b = 0; b < ROWS; ++b) acc[b] = zero();
        for (int64_t k = 0; k < K; k += LANES) {
            const int64_t left = K - k < LANES ? K - k : LANES;
            vec v = int8s(row + k, left);
            for (int b = 0; b < ROWS; ++b)
                if (b < B) acc[b] = fma(v, load(x + b * K + k, left), acc[b]);
        }
        for (int b = 0; b < B; ++b) y[b * N + n] = hsum(acc[b]) * scales[n];
    }
}

static inline float bf16(uint16_t h) {
    union { uint32_t u; float f; } v = { (uint32_t)h << 16 };
    return v.f;
}

/* y (B, N) float32 = x (B, K) float32 . W^T with W[n, k] = (code - 8) * scale + zero of k's group of G, B <= ROWS.
   w (N, K / 2): in each 32 input channels of a row, byte j holds the code of channel j (low nibble) and of channel
   16 + j (high nibble). sz (N, K / G, 2): each group's scale and zero, bfloat16 (sz_bf16) or float32. G is a
   multiple of 32. A weight is code * scale + (zero - 8 * scale), one rounding as in (code - 8) * scale + zero. */
void int4_gemv(const float* x, const uint8_t* w, const void* sz, int sz_bf16, float* y, int64_t B, int64_t N,
               int64_t K, int64_t G, int threads) {
    const int64_t groups = K / G;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t* row = w + n * (K / 2);
        vec acc[ROWS];
        for (int b = 0; b < ROWS; ++b) acc[b] = zero();
        for (int64_t g = 0; g < groups; ++g) {
            const int64_t at = 2 * (n * groups + g);
            const float s = sz_bf16 ? bf16(((const uint16_t*)sz)[at]) : ((const float*)sz)[at];
            const float z = sz_bf16 ? bf16(((const uint16_t*)sz)[at + 1]) : ((const float*)sz)[at + 1];
            const vec vs = set1(s), vz = set1(z - 8 * s);
            for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
                for (int h = 0; h < 16; h += LANES) {
                    vec lo, hi;
                    nibbles(row + k / 2 + h, &lo, &hi);
                    lo = fma(lo, vs, vz);  /* channels k + h ... */
                    hi = fma(hi, vs, vz);  /* channels k + 16 + h ... */
                    for (int b = 0; b < ROWS; ++b) {
                        if (b < B) {
                            acc[b] = fma(lo, load(x + b * K + k + h, LANES), acc[b]);
                            acc[b] = fma(hi, load(x + b * K + k + 16 + h, LANES), acc[b]);
                        }
                    }
                }
            }
        }
        for (int b = 0; b < B; ++b) y[b * N + n] = hsum(acc[b]);
    }
}
"""


@cache
def isa() -> str | None:
    """The instruction set the decode kernel is built for: avx512 or avx2 (with FMA, and gcc to build it), else None."""
    capability = torch._C._cpu._get_cpu_capability()
    if shutil.which("gcc") is None or not (capability.get("avx2") and capability.get("fma3")):
        return None
    return "avx512" if all(capability.get(f) for f in ("avx512f", "avx512bw", "avx512vl")) else "avx2"


@cache
def bf16_units() -> bool:
    """Whether oneDNN computes bfloat16 natively here (AVX-512-BF16 or AMX)."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


@cache
def _library(target: str) -> ctypes.CDLL:
    """The kernel for `target` (a key of ISA_FLAGS), built once per source and flags into CACHE (a temporary file
    renamed into place, so workers starting together never load half a library)."""
    flags = FLAGS + ISA_FLAGS[target]
    digest = hashlib.sha256((SOURCE + " ".join(flags)).encode()).hexdigest()[:16]
    path = CACHE / f"bf16_gemv-{digest}.so"
    if not path.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            source = Path(tmp) / "bf16_gemv.c"
            source.write_text(SOURCE)
            subprocess.run(["gcc", *flags, str(source), "-o", str(Path(tmp) / "lib.so")], check=True,
                           capture_output=True)
            os.replace(Path(tmp) / "lib.so", path)
    lib = ctypes.CDLL(str(path))
    lib.bf16_gemv.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.int8_gemv.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.int4_gemv.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_int]
    lib.rows.restype = ctypes.c_int
    return lib


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) for bfloat16 x (..., K) and weight (N, K) on the CPU, in float32, rounded once."""
    N, K = weight.shape
    if x.numel() // K > DECODE_ROWS and bf16_units():
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, K).float().contiguous()  # (R, K)
    if rows.shape[0] <= DECODE_ROWS and weight.is_contiguous() and K % 8 == 0:
        y = _rows_at_a_time(rows, N, lambda lib, part, out, B, threads: lib.bf16_gemv(
            part.data_ptr(), weight.data_ptr(), out.data_ptr(), B, N, K, threads))
    else:
        y = torch.cat([rows @ weight[i:i + PREFILL_BLOCK].float().T for i in range(0, N, PREFILL_BLOCK)], dim=1)
    if bias is not None:
        y += bias.float()
    return y.to(torch.bfloat16).view(*x.shape[:-1], N)


def _rows_at_a_time(x: Tensor, N: int, call) -> Tensor:
    """y (R, N) float32 from x (R <= DECODE_ROWS, K) float32 rows, `call(lib, part, out, B, threads)` running the
    kernel on as many rows as it takes at a time (8 with AVX-512, else 4)."""
    lib, threads = _library(isa()), torch.get_num_threads()
    y = torch.empty(x.shape[0], N)
    for i in range(0, x.shape[0], lib.rows()):
        part = x[i:i + lib.rows()]
        call(lib, part, y[i:], part.shape[0], threads)
    return y


def int8_gemv(x: Tensor, codes: Tensor, scales: Tensor) -> Tensor:
    """x (R <= DECODE_ROWS, K) float32 . (codes (N, K) int8 * scales (N,) float32)^T → (R, N) float32; K a multiple
    of 8, every tensor contiguous on the CPU."""
    (N, K), scales = codes.shape, scales.float().contiguous()
    return _rows_at_a_time(x, N, lambda lib, part, out, B, threads: lib.int8_gemv(
        part.data_ptr(), codes.data_ptr(), scales.data_ptr(), out.data_ptr(), B, N, K, threads))


def int4_gemv(x: Tensor, packed: Tensor, scales_and_zeros: Tensor, group_size: int) -> Tensor:
    """x (R <= DECODE_ROWS, K) float32 . W^T → (R, N) float32, W[n, k] = (code - 8) * scale + zero of k's group:
    packed (N, K / 2) uint8 in the int4_gemv layout (the C source), scales_and_zeros (N, K / group_size, 2) bfloat16
    or float32, group_size a multiple of 32; every tensor contiguous on the CPU."""
    N, K = packed.shape[0], x.shape[1]
    bf16 = int(scales_and_zeros.dtype == torch.bfloat16)
    return _rows_at_a_time(x, N, lambda lib, part, out, B, threads: lib.int4_gemv(
        part.data_ptr(), packed.data_ptr(), scales_and_zeros.data_ptr(), bf16, out.data_ptr(), B, N, K, group_size,
        threads))


class BF16Linear(nn.Linear):
    """nn.Linear whose bfloat16 product runs on `linear` above (a copy cast to another dtype runs as nn.Linear)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.dtype != torch.bfloat16 or x.dtype != torch.bfloat16:
            return super().forward(x)
        return linear(x, self.weight, self.bias)


def adopt(module: nn.Module) -> int:
    """Puts BF16Linear in place of module's bfloat16 CPU nn.Linear layers (K a multiple of 8) when the decode kernel
    can be built here; returns how many it replaced."""
    if isa() is None:
        return 0
    replaced = 0
    for sub in module.modules():
        w = getattr(sub, "weight", None)
        if type(sub) is nn.Linear and w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.shape[1] % 8 == 0:
            sub.__class__ = BF16Linear
            replaced += 1
    return replaced
