"""Quantized LLM half (llm_worker/quant.py): int8 and int4 models equal, in float32, the float model whose weights are
their dequantized weights; AWQ checkpoints load in AutoAWQ's GEMM packing; configs and shapes that do not fit are
refused by name.

The tiny checkpoint here is 128 wide (intermediate 256), so every projection takes int4 groups of 128, as the real
checkpoints do, and every output width is a multiple of the CPU int4 kernel's 16 rows.

Tolerance: the quantized kernels and the reference's dense matmul both compute in float32 from the same weights
(codes times scales as stored), so they differ only by the order of the sums: about 1e-6 of the largest logit,
measured. 1e-4 of the largest logit leaves room for other summation orders and is still far below what one wrong
code costs (a code is a step of 1/127 of a row's largest weight for int8, 1/15 of a group's range for int4)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.checkpoint import canonical_name
from common.messages import SamplingParams
from common.options import LLM_OPTIONS, Options
from llm_worker.engine import Engine
from llm_worker.inputs import prefill_inputs
from llm_worker.model import LanguageModel
from llm_worker.quant import (Int4Linear, Int8Linear, awq_group_size, int4_group_size, quantize_int4, quantize_int8,
                              unpack_awq_int32)
from common.config import load_config
from tests.conftest import write_tiny_checkpoint

IMG, START, END, IM_START, IM_END = 151655, 151652, 151653, 151644, 151645
WIDE = dict(hidden_size=128, intermediate_size=256,  # 4 heads of 32: mrope_section sums to 16
            rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1e6})
AWQ_QUANTIZATION_CONFIG = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
AWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ WQLinear_GEMM.from_linear: nibble i holds column order_map[i]
TOLERANCE = 1e-4  # of the largest reference logit; see the module docstring


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory, tokenizer_dir):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny128"), tokenizer_dir, seed=5, text=WIDE,
                                 vision=dict(out_hidden_size=128))


def projections(model: LanguageModel):
    for layer in model.model.layers:
        yield from (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)


def dequantized_reference(model_dir, quantization: str) -> LanguageModel:
    """The float32 model whose projections are the dequantized weights: codes * scale (int8), or (codes - 8) *
    scale + zero of the weight's group of 128 (int4). Quantizing a stacked matrix equals stacking quantized parts:
    scales are per output channel, groups run along the input."""
    model = LanguageModel.from_pretrained(model_dir, torch.float32)
    for linear in projections(model):
        w = linear.weight.data
        if quantization == "int8":
            codes, scales = quantize_int8(w, torch.float32)
            linear.weight.data = codes.float() * scales[:, None]
        else:
            codes, scales, zeros = quantize_int4(w, 128, torch.float32)
            linear.weight.data = (codes.float() - 8) * scales.repeat_interleave(128, 1) + zeros.repeat_interleave(128, 1)
    return model


def image_prompt(model: LanguageModel, model_dir):
    """A chat turn with one 1x8x8 image (16 merged tokens of seeded embeddings) → embeds, positions, rope delta."""
    ids = [IM_START, 872, 198, START] + [IMG] * 16 + [END, 3838, 374, 419, 30, IM_END, 198, IM_START, 77091, 198]
    image_embeds = torch.randn(16, model.config.hidden_size, generator=torch.Generator().manual_seed(7))
    return prefill_inputs(model, load_config(model_dir), ids, image_embeds, None, [(1, 8, 8)])


def logits_over_steps(model: LanguageModel, model_dir, steps: int = 8) -> list[torch.Tensor]:
    """Prefill logits of every prompt token, then the logits of `steps` greedy decode steps (forced to the tokens
    `model` picks, so two models are compared on the same inputs only if they agree; the tests compare each step)."""
    embeds, positions, _ = image_prompt(model, model_dir)
    S = embeds.shape[0]
    cache = model.new_cache(1, S + steps)
    with torch.inference_mode():
        out = [model(embeds[None], positions[:, None], torch.arange(S)[None], cache)[0]]
        pos = positions[:, -1:].clone()
        for i in range(steps):
            token = out[-1][-1:].argmax(-1)
            pos = pos + 1
            out.append(model(model.embed(token)[None], pos[:, None], torch.tensor([[S + i]]), cache)[0])
    return out


def assert_logits_close(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> None:
    for step, (a, b) in enumerate(zip(ours, reference)):
        scale = b.abs().max()
        assert (a - b).abs().max() <= TOLERANCE * scale, f"step {step}: {(a - b).abs().max() / scale:.2e} of the largest"


def test_int8_codes_round_to_nearest_at_one_scale_per_output_channel():
    w = torch.randn(32, 200) * torch.linspace(0.01, 2, 32)[:, None]
    codes, scales = quantize_int8(w, torch.float32)
    assert codes.dtype == torch.int8 and scales.shape == (32,)
    assert (codes.abs().amax(1) == 127).all()  # each row's largest weight is code ±127
    assert ((w - codes.float() * scales[:, None]).abs() <= scales[:, None] / 2 * (1 + 1e-5)).all()


def test_int4_codes_round_to_nearest_within_each_group_of_128():
    w = torch.randn(16, 256) * torch.linspace(0.01, 2, 16)[:, None]
    codes, scales, zeros = quantize_int4(w, 128, torch.float32)
    assert codes.dtype == torch.uint8 and scales.shape == zeros.shape == (16, 2)
    groups = codes.view(16, 2, 128)
    assert (groups.amin(-1) == 0).all() and (groups.amax(-1) == 15).all()  # each group's min and max are codes 0, 15
    dequantized = (codes.float() - 8) * scales.repeat_interleave(128, 1) + zeros.repeat_interleave(128, 1)
    assert ((w - dequantized).abs() <= scales.repeat_interleave(128, 1) / 2 * (1 + 1e-4)).all()


def test_awq_int32_unpacks_in_awq_order():
    # channels 0..7 holding the values 0..7, packed as AutoAWQ does: nibble i (from the low end) holds channel
    # [0, 2, 4, 6, 1, 3, 5, 7][i], so reading the nibbles from the high end gives 7 5 3 1 6 4 2 0
    assert unpack_awq_int32(torch.tensor([[0x75316420]], dtype=torch.int32)).tolist() == [list(range(8))]
    # the top nibble past 7 makes the int32 negative: the shift must not smear its sign into the values
    assert unpack_awq_int32(torch.tensor([[0xF0000000 - 2**32]], dtype=torch.int32)).tolist() == [[0] * 7 + [15]]


@pytest.mark.parametrize("quantization,module", [("int8", Int8Linear), ("int4", Int4Linear)])
def test_quantized_logits_match_the_dequantized_float32_model(wide_model, quantization, module):
    ours = LanguageModel.from_pretrained(wide_model, torch.float32, quantization=quantization)
    assert all(isinstance(linear, module) for linear in projections(ours))
    assert isinstance(ours.lm_head, torch.nn.Linear)  # lm_head and embeddings stay float, as in AWQ checkpoints
    reference = dequantized_reference(wide_model, quantization)
    assert_logits_close(logits_over_steps(ours, wide_model), logits_over_steps(reference, wide_model))


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_greedy_tokens_equal_the_dequantized_model_through_the_engine(wide_model, quantization):
    tokens = []
    for model in (LanguageModel.from_pretrained(wide_model, torch.float32, quantization=quantization),
                  dequantized_reference(wide_model, quantization)):
        embeds, positions, delta = image_prompt(model, wide_model)
        engine = Engine(model, max_batch=2, max_len=64)
        params = SamplingParams(max_new_tokens=16, ignore_eos=True)
        tokens.append([t for t, _ in engine.generate(embeds, positions, delta, params, [IM_END])])
    assert len(tokens[0]) == 16 and tokens[0] == tokens[1]


def test_int8_and_int4_run_in_bfloat16(wide_model):
    """The dtype the workers default to: prefill logits within each method's quantization error of the bfloat16 float
    model's (in float32 this checkpoint's prefill logits move by 1% of the largest with int8 and 15% with int4)."""
    float_logits = logits_over_steps(LanguageModel.from_pretrained(wide_model, torch.bfloat16), wide_model, steps=0)[0]
    for quantization, bound in (("int8", 0.05), ("int4", 0.25)):
        model = LanguageModel.from_pretrained(wide_model, torch.bfloat16, quantization=quantization)
        logits = logits_over_steps(model, wide_model, steps=0)[0]
        assert (logits - float_logits).abs().max() <= bound * float_logits.abs().max()


# ---- AWQ checkpoints ----


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """(R, 8C) 4-bit values → (R, C) int32, packed as AutoAWQ's WQLinear_GEMM.from_linear packs qweight and qzeros."""
    packed = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int32)
    for i, column in enumerate(AWQ_ORDER_MAP):
        packed |= values[:, column::8].to(torch.int32) << (4 * i)
    return packed


def write_awq_checkpoint(float_dir, out, dequantized_out, seed=0):
    """An AWQ GEMM checkpoint of known int4 weights in every decoder projection of `float_dir`'s (the rest as it
    was), and beside it the float32 checkpoint of the same weights dequantized as AWQ does: (code - zero) * scale."""
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(float_dir / "model.safetensors")
    awq, dequantized = {}, {}
    for name, tensor in tensors.items():
        if not (canonical_name(name).startswith("model.layers.") and name.endswith("_proj.weight")):
            awq[name] = dequantized[name] = tensor
            continue
        N, K = tensor.shape
        codes = torch.randint(0, 16, (K, N), generator=g)  # AWQ stores the weight transposed: (in, out)
        zeros = torch.randint(0, 16, (K // 128, N), generator=g)
        scales = (torch.rand(K // 128, N, generator=g) * 0.004 + 0.001).half()
        prefix = name[: -len("weight")]
        awq.update({prefix + "qweight": awq_pack(codes), prefix + "qzeros": awq_pack(zeros), prefix + "scales": scales})
        w = (codes - zeros.repeat_interleave(128, 0)) * scales.float().repeat_interleave(128, 0)  # (K, N)
        dequantized[name] = w.T.contiguous()
    config = json.loads((float_dir / "config.json").read_text())
    for directory, state, extra in ((out, awq, {"quantization_config": AWQ_QUANTIZATION_CONFIG}),
                                    (dequantized_out, dequantized, {})):
        directory.mkdir()
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps({**config, **extra}))
    return out, dequantized_out


@pytest.fixture(scope="module")
def awq_model(wide_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("awq")
    return write_awq_checkpoint(wide_model, root / "awq", root / "dequantized")


def test_an_awq_checkpoint_loads_as_int4_and_matches_its_dequantized_weights(awq_model):
    awq_dir, dequantized_dir = awq_model
    ours = LanguageModel.from_pretrained(awq_dir, torch.float32)
    assert all(isinstance(linear, Int4Linear) and linear.group_size == 128 for linear in projections(ours))
    reference = LanguageModel.from_pretrained(dequantized_dir, torch.float32)
    assert_logits_close(logits_over_steps(ours, awq_dir), logits_over_steps(reference, dequantized_dir))


def test_int4_on_an_awq_checkpoint_changes_nothing_and_int8_is_refused(awq_model):
    awq_dir, _ = awq_model
    model = LanguageModel.from_pretrained(awq_dir, torch.float32, quantization="int4")
    assert all(isinstance(linear, Int4Linear) for linear in projections(model))
    with pytest.raises(ValueError, match="AWQ checkpoint, which loads as int4"):
        LanguageModel.from_pretrained(awq_dir, torch.float32, quantization="int8")


@pytest.mark.parametrize("wrong", [{"bits": 8}, {"quant_method": "gptq"}, {"version": "gemv"}, {"zero_point": False},
                                   {"group_size": 100}, {"group_size": -1}])
def test_a_quantization_config_other_than_awq_4bit_gemm_is_refused(wrong):
    with pytest.raises(ValueError, match="quantization_config .* is not one this loader reads"):
        awq_group_size({**AWQ_QUANTIZATION_CONFIG, **wrong}, "ckpt")


def test_a_checkpoint_with_a_wrong_quantization_config_fails_to_load_naming_it(awq_model, tmp_path):
    awq_dir, _ = awq_model
    (tmp_path / "model.safetensors").symlink_to(awq_dir / "model.safetensors")
    config = json.loads((awq_dir / "config.json").read_text())
    config["quantization_config"]["bits"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"got \{'bits': 8\}"):
        LanguageModel.from_pretrained(tmp_path, torch.float32)


# ---- shapes and options ----


def test_int4_refuses_rows_that_are_not_groups_of_128_naming_the_tensor():
    assert int4_group_size("w", 64) == 64 and int4_group_size("w", 384) == 128  # a 64-wide row is one group
    with pytest.raises(ValueError, match="'model.layers.0.mlp.down_proj.weight' has 96"):
        int4_group_size("model.layers.0.mlp.down_proj.weight", 96)
    with pytest.raises(ValueError, match="has 200; use --quantization int8"):
        int4_group_size("w", 200)


def test_int4_packs_more_output_channels_than_one_block_as_one_matrix():
    # quantize_linears packs ROWS_AT_ONCE (2048) rows at a time; the tiny checkpoints never have that many
    w = torch.randn(2048 + 272, 256)
    codes, scales, zeros = quantize_int4(w, 128, torch.float32)
    linear = Int4Linear.from_codes(codes, scales, zeros, None, "x")
    dequantized = (codes.float() - 8) * scales.repeat_interleave(128, 1) + zeros.repeat_interleave(128, 1)
    x = torch.randn(3, 256)
    reference = x @ dequantized.T
    assert (linear(x) - reference).abs().max() <= TOLERANCE * reference.abs().max()


@pytest.mark.parametrize("units", [False, True])
def test_int8_bfloat16_prefill_on_dequantized_weights_equals_the_int8_kernel_within_rounding(units, monkeypatch):
    """With bfloat16 units a bfloat16 prefill runs on the weight dequantized to bfloat16 (one rounding of code times
    scale) through oneDNN; without them, and for decode rows, on `_weight_int8pack_mm`. Both stay within bfloat16
    rounding of float32 arithmetic on the int8 weights (2048 + 16 output channels: two dequantized blocks)."""
    from common import kernels

    monkeypatch.setattr(kernels, "bf16_units", lambda: units)
    torch.manual_seed(3)
    codes, scales = quantize_int8(torch.randn(2048 + 16, 128).bfloat16(), torch.bfloat16)
    linear = Int8Linear(codes, scales, torch.randn(2048 + 16).bfloat16())
    for rows in (4, 40):
        x = torch.randn(rows, 128).bfloat16()
        reference = x.float() @ (codes.float() * scales.float()[:, None]).T + linear.bias.float()
        assert (linear(x).float() - reference).abs().max() <= 2**-6 * reference.abs().max()


def test_int4_refuses_output_widths_the_kernel_cannot_pack():
    codes, scales, zeros = quantize_int4(torch.randn(24, 128), 128, torch.float32)
    with pytest.raises(ValueError, match="16 at a time: tensor 'x' has 24"):
        Int4Linear.from_codes(codes, scales, zeros, None, "x")


def test_unknown_quantization_is_refused(tiny_model):
    with pytest.raises(ValueError, match="quantization must be one of"):
        LanguageModel.from_pretrained(tiny_model, torch.float32, quantization="int3")


def test_quantization_is_an_llm_worker_option():
    argv = Options(quantization="int4").argv(LLM_OPTIONS)
    assert argv[argv.index("--quantization") + 1] == "int4"
    assert "--quantization" not in Options().argv(LLM_OPTIONS)  # unset: the worker loads the checkpoint as it is
