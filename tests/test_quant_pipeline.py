"""Quantized weights through the real worker processes: `--quantization int8` reaches the LLM worker and, on weights
that int8 holds exactly, answers as the float model does; an AWQ checkpoint answers as its dequantized weights do."""

import json
import shutil

import torch
from safetensors.torch import load_file, save_file

from common.checkpoint import canonical_name
from tests.conftest import write_tiny_checkpoint
from tests.test_pipeline import image_file, run_launch  # noqa: F401 (a fixture)
from tests.test_quant import wide_model, write_awq_checkpoint  # noqa: F401 (a fixture)


def tokens(model_dir, image, *extra) -> list[int]:
    out = run_launch("--model", str(model_dir), "--dtype", "float32", "--image", str(image), "--prompt",
                     "What is it?", "--max-new-tokens", "12", "--json", *extra)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])["token_ids"]


def with_files_of(model_dir, source) -> None:
    """Copies what a pipeline needs besides config.json and the tensors (tokenizer, processor, generation config)."""
    for f in source.iterdir():
        if f.name != "config.json" and not f.name.endswith(".safetensors"):
            shutil.copy(f, model_dir / f.name)


def test_an_awq_checkpoint_answers_through_the_pipeline_as_its_dequantized_weights(wide_model, image_file,
                                                                                    tmp_path):
    awq, dequantized = write_awq_checkpoint(wide_model, tmp_path / "awq", tmp_path / "dequantized")
    for directory in (awq, dequantized):
        with_files_of(directory, wide_model)
    assert tokens(awq, image_file) == tokens(dequantized, image_file)


def test_int8_through_the_pipeline_answers_as_the_float_model_on_weights_int8_holds_exactly(wide_model, image_file,
                                                                                           tmp_path):
    """Each projection row is integer codes in [-127, 127] (one of them ±127) times a power of two: int8's scale is
    that power of two and its codes are those codes, so the quantized model is the float model."""
    g = torch.Generator().manual_seed(3)
    tensors = load_file(wide_model / "model.safetensors")
    for name, tensor in tensors.items():
        if canonical_name(name).startswith("model.layers.") and name.endswith("_proj.weight"):
            codes = torch.randint(-127, 128, tensor.shape, generator=g)
            codes[:, 0] = 127
            tensors[name] = codes.float() * 2.0**-9
    exact = tmp_path / "exact"
    exact.mkdir()
    save_file(tensors, exact / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(wide_model / "config.json", exact / "config.json")
    with_files_of(exact, wide_model)
    assert tokens(exact, image_file, "--quantization", "int8") == tokens(exact, image_file)


def test_the_quantization_flag_reaches_the_llm_worker(tokenizer_dir, image_file, tmp_path):
    """An intermediate size of 200 is no multiple of int4's groups of 128: an LLM worker that quantizes refuses it by
    name, one that ignored the flag would answer (and int8, which has no groups, does)."""
    model = write_tiny_checkpoint(tmp_path / "odd", tokenizer_dir, text=dict(intermediate_size=200))
    args = ("--model", str(model), "--dtype", "float32", "--image", str(image_file), "--prompt", "Hi",
            "--max-new-tokens", "2", "--quantization")
    assert run_launch(*args, "int8").returncode == 0
    out = run_launch(*args, "int4")
    assert out.returncode != 0 and "down_proj" in out.stderr and "int8" in out.stderr, out.stderr
