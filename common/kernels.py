"""bfloat16 linear layers on x86 CPUs: a decode kernel of our own, and float32 GEMM for prefill where the CPU has
no bfloat16 arithmetic.

PyTorch's bfloat16 linear reads a decode step's weights below memory bandwidth: oneDNN on an AVX-512-BF16 CPU at
0.4-0.7x our kernel's speed for one row (README "bfloat16 kernels"), and on an AVX2-only CPU, where oneDNN's
bfloat16 path is off, PyTorch's fallback converts element by element (2-3x slower than ours there, and 5-8x slower
than float32 GEMM for prefill and the ViT).

BF16Linear, which `adopt` puts in place of a model's bfloat16 nn.Linear layers on an x86 CPU with AVX2 and FMA,
computes in float32 and rounds the result to bfloat16 once, as oneDNN's bfloat16 linear does, so its results equal
F.linear's up to the order of the float32 sums:
- up to decode_rows() rows (decode: 8, or 2 where oneDNN has bfloat16 arithmetic and wins from 3 rows on): a small
  C kernel built with the system's gcc at first use in a second and cached, called through ctypes, that reads each
  weight once for all rows: AVX-512-BF16 dot products of bfloat16 pairs where the CPU has them, else bfloat16
  widened to float32 in registers (a 16-bit shift) and FMA, in AVX-512 or AVX2; over torch's thread count with
  OpenMP;
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
AVX512 = ["-mavx2", "-mavx512f", "-mavx512bw", "-mavx512vl"]
ISA_FLAGS = {"avx512bf16": AVX512 + ["-mavx512bf16"], "avx512": AVX512, "avx2": ["-mavx2"]}

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>

/* Per target: LANES weights a step, the accumulator (float32 lanes), how a step's weights (bfloat16) and inputs
   (xtype) load, n <= LANES of them with zeros past n, and acc += w . x over those lanes. */
#if defined(__AVX512BF16__)  /* bfloat16 pairs: acc[i] += w[2i] x[2i] + w[2i+1] x[2i+1], products exact in float32 */
#define LANES 32
#define X_BF16 1
typedef uint16_t xtype;
typedef __m512bh wvec;
typedef __m512bh xvec;
static inline __m512bh pairs(const uint16_t* p, int64_t n) {
    return (__m512bh)_mm512_maskz_loadu_epi16(n >= 32 ? ~(__mmask32)0 : (__mmask32)((1u << n) - 1), p);
}
static inline wvec wload(const uint16_t* p, int64_t n) { return pairs(p, n); }
static inline xvec xload(const uint16_t* p, int64_t n) { return pairs(p, n); }
static inline __m512 mac(__m512 acc, wvec w, xvec x) { return _mm512_dpbf16_ps(acc, w, x); }
#elif defined(__AVX512F__)  /* bfloat16 widened to float32 in registers (a 16-bit shift), then FMA */
#define LANES 16
#define X_BF16 0
typedef float xtype;
typedef __m512 wvec;
typedef __m512 xvec;
static inline wvec wload(const uint16_t* p, int64_t n) {
    __m256i h = _mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline xvec xload(const float* p, int64_t n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
static inline __m512 mac(__m512 acc, wvec w, xvec x) { return _mm512_fmadd_ps(w, x, acc); }
#else  /* AVX2: as AVX-512, 8 lanes; K is a multiple of 8 here, so n is always 8 */
#define LANES 8
#define X_BF16 0
typedef float xtype;
typedef __m256 wvec;
typedef __m256 xvec;
static inline wvec wload(const uint16_t* p, int64_t n) {
    __m128i h = _mm_loadu_si128((const __m128i*)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline xvec xload(const float* p, int64_t n) { return _mm256_loadu_ps(p); }
static inline __m256 mac(__m256 acc, wvec w, xvec x) { return _mm256_fmadd_ps(w, x, acc); }
#endif

#ifdef __AVX512F__
typedef __m512 acc_t;
static inline acc_t zero(void) { return _mm512_setzero_ps(); }
static inline float hsum(acc_t v) { return _mm512_reduce_add_ps(v); }
#else
typedef __m256 acc_t;
static inline acc_t zero(void) { return _mm256_setzero_ps(); }
static inline float hsum(acc_t v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
#endif

int x_bf16(void) { return X_BF16; }

/* y (B, N) float32 = x (B, K) . w (N, K) bfloat16 ^T, x bfloat16 if x_bf16() else float32, for B <= ROWS and K a
   multiple of 8: COLS output channels at a time (the last repeated when N is not a multiple), each weight read once
   for all B rows. More channels at a time keep more streams of weights in flight: one row reads at 1.3-1.4x the
   bandwidth with 8 than with 2 (AVX-512-BF16). Each step also prefetches the next block's channels at the same
   offset: the hardware prefetchers stop at 4 KiB page boundaries, which a mapped checkpoint's weights have at every
   row of a 2048-wide layer (1.07-1.10x the read rate on 4 KiB pages, AVX-512-BF16 Xeon). */
#define STEP(COLS, ROWS, lanes) {                                                                            \
            wvec v[COLS];                                                                                    \
            for (int c = 0; c < COLS; ++c) {                                                                 \
                _mm_prefetch((const char*)(wn[c] + k), _MM_HINT_T0);                                         \
                v[c] = wload(wc[c] + k, lanes);                                                              \
            }                                                                                                \
            for (int b = 0; b < ROWS; ++b) {                                                                 \
                if (b < B) {                                                                                 \
                    xvec xv = xload(x + b * K + k, lanes);                                                   \
                    for (int c = 0; c < COLS; ++c) a[b][c] = mac(a[b][c], v[c], xv);                         \
                }                                                                                            \
            }                                                                                                \
        }
#define GEMV(name, COLS, ROWS)                                                                               \
int name##_rows(void) { return ROWS; }                                                                       \
void name(const xtype* x, const uint16_t* w, float* y, int64_t B, int64_t N, int64_t K, int threads) {       \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                                        \
    for (int64_t n = 0; n < N; n += COLS) {                                                                  \
        const uint16_t *wc[COLS], *wn[COLS];                                                                 \
        for (int c = 0; c < COLS; ++c) {                                                                     \
            wc[c] = w + (n + c < N ? n + c : N - 1) * K;                                                     \
            wn[c] = w + (n + COLS + c < N ? n + COLS + c : N - 1) * K;                                       \
        }                                                                                                    \
        acc_t a[ROWS][COLS];                                                                                 \
        for (int b = 0; b < ROWS; ++b)                                                                       \
            for (int c = 0; c < COLS; ++c) a[b][c] = zero();                                                 \
        int64_t k = 0;                                                                                       \
        for (; k + LANES <= K; k += LANES) STEP(COLS, ROWS, LANES)                                           \
        if (k < K) STEP(COLS, ROWS, K - k)                                                                   \
        for (int b = 0; b < B; ++b)                                                                          \
            for (int c = 0; c < COLS && n + c < N; ++c) y[b * N + n + c] = hsum(a[b][c]);                    \
    }                                                                                                        \
}

#ifdef __AVX512F__  /* 32 registers: 16 accumulators */
GEMV(gemv_wide, 8, 2)
GEMV(gemv_narrow, 2, 8)
#else  /* 16 registers: 8 accumulators */
GEMV(gemv_wide, 4, 2)
GEMV(gemv_narrow, 2, 4)
#endif
"""


@cache
def isa() -> str | None:
    """The instruction set the decode kernel is built for: avx512bf16, avx512 or avx2 (with FMA, and gcc to build it),
    else None."""
    capability = torch._C._cpu._get_cpu_capability()
    if shutil.which("gcc") is None or not (capability.get("avx2") and capability.get("fma3")):
        return None
    if not all(capability.get(f) for f in ("avx512_f", "avx512_bw", "avx512_vl")):
        return "avx2"
    return "avx512bf16" if capability.get("avx512_bf16") else "avx512"


def decode_rows() -> int:
    """Rows up to which our kernel beats the alternative: PyTorch's bfloat16 fallback always (8 is where prefill's
    float32 GEMM path takes over); oneDNN's bfloat16 GEMM from 3 rows on (it reads at 0.8-0.9x ours at 1 row, ours
    at 0.8-0.9x its at 4-8 rows, AVX-512-BF16)."""
    return 2 if bf16_units() else DECODE_ROWS


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
    for name in ("gemv_wide", "gemv_narrow"):
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
        getattr(lib, name).restype = None
    lib.gemv_wide_rows.restype = lib.gemv_narrow_rows.restype = lib.x_bf16.restype = ctypes.c_int
    # asked once here, not on every call: rows each variant takes at a time, and whether x goes in as bfloat16
    lib.wide_rows, lib.narrow_rows, lib.bf16_input = lib.gemv_wide_rows(), lib.gemv_narrow_rows(), bool(lib.x_bf16())
    return lib


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) for bfloat16 x (..., K) and weight (N, K) on the CPU, in float32, rounded once."""
    N, K = weight.shape
    rows = x.reshape(-1, K)  # (R, K)
    if rows.shape[0] <= decode_rows() and weight.is_contiguous() and K % 8 == 0:
        lib, threads = _library(isa()), torch.get_num_threads()
        rows = (rows if lib.bf16_input else rows.float()).contiguous()
        y = torch.empty(rows.shape[0], N)
        wide = rows.shape[0] <= lib.wide_rows  # one or two rows: more output channels at a time
        gemv, at_once = (lib.gemv_wide, lib.wide_rows) if wide else (lib.gemv_narrow, lib.narrow_rows)
        for i in range(0, rows.shape[0], at_once):
            part = rows[i:i + at_once]
            gemv(part.data_ptr(), weight.data_ptr(), y[i:].data_ptr(), part.shape[0], N, K, threads)
    elif bf16_units():
        return F.linear(x, weight, bias)
    else:
        rows = rows.float()
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
