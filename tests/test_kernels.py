"""common/kernels.py: the bfloat16 linear equals float32 arithmetic on the same bfloat16 values rounded once (what
oneDNN's bfloat16 linear computes), on the decode kernel's path (each instruction set this CPU has) and the prefill
paths (with and without bfloat16 units) alike, for every row count, odd widths, bias and batched shapes; models
adopt it only where it applies."""


import pytest
import torch
import torch.nn.functional as F

from common import kernels

pytestmark = pytest.mark.skipif(kernels.isa() is None,
                                reason="the kernel is AVX2 or AVX-512 C built with gcc: this CPU or machine has neither")
LEVELS = ["avx2", "avx512", "avx512bf16"]
TARGETS = LEVELS[:LEVELS.index(kernels.isa()) + 1] if kernels.isa() else []  # the CPU's kernel and those below it


@pytest.fixture(params=[(t, units) for t in TARGETS for units in (False, True)], ids=lambda p: f"{p[0]}-units{p[1]}")
def target(request, monkeypatch):
    """Each kernel this CPU can run, and the prefill path with and without oneDNN's bfloat16 (F.linear there; on a CPU
    without bfloat16 units F.linear runs PyTorch's fallback, slower but the same arithmetic)."""
    isa, units = request.param
    monkeypatch.setattr(kernels, "isa", lambda: isa)
    monkeypatch.setattr(kernels, "bf16_units", lambda: units)
    return request.param


def reference(x, w, b=None):
    """float32 products and sums of the bfloat16 values, rounded to bfloat16 once."""
    return F.linear(x.float(), w.float(), None if b is None else b.float()).bfloat16()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 33])
@pytest.mark.parametrize("n, k", [(7, 16), (130, 64), (4097, 40), (33, 8)])
def test_linear_equals_float32_arithmetic_rounded_once(rows, n, k, target):
    torch.manual_seed(rows * n + k)
    x, w, b = torch.randn(rows, k).bfloat16(), torch.randn(n, k).bfloat16(), torch.randn(n).bfloat16()
    for bias in (None, b):
        ours, ref = kernels.linear(x, w, bias), reference(x, w, bias)
        assert ours.dtype == torch.bfloat16 and ours.shape == (rows, n)
        # the float32 sums may differ in order only: at most one bfloat16 step apart, and nearly all equal
        step = ref.float().abs().clamp(min=1e-3) * 2**-7
        assert ((ours.float() - ref.float()).abs() <= step).all()
        assert (ours == ref).float().mean() > 0.97


def test_batched_shapes_and_a_non_contiguous_weight(target):
    x, w = torch.randn(2, 3, 64).bfloat16(), torch.randn(96, 64).bfloat16()
    ours = kernels.linear(x, w)
    assert ours.shape == (2, 3, 96) and torch.equal(ours, kernels.linear(x.reshape(6, 64), w).view(2, 3, 96))
    strided = torch.randn(64, 96).bfloat16().T  # (96, 64), not contiguous: the GEMM path, same numbers
    assert ((kernels.linear(x[0, :1], strided).float() - reference(x[0, :1], strided).float()).abs()
            <= reference(x[0, :1], strided).float().abs().clamp(min=1e-3) * 2**-7).all()


def test_models_adopt_it_only_where_it_applies():
    layer = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8)).bfloat16()
    expected = 2 if kernels.isa() else 0
    assert kernels.adopt(layer) == expected
    x = torch.randn(3, 64).bfloat16()
    assert (layer(x).float() - reference(reference(x, layer[0].weight, layer[0].bias), layer[1].weight,
                                         layer[1].bias).float()).abs().max() < 0.05
    assert kernels.adopt(torch.nn.Linear(64, 8)) == 0  # float32 stays nn.Linear
    half = torch.nn.Linear(64, 8).bfloat16()
    kernels.adopt(half)
    assert half.float()(torch.randn(2, 64)).dtype == torch.float32  # a float32 copy runs as nn.Linear
