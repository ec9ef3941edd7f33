"""Checkpoints load in both tensor-name layouts, sharded, with 4.x or 5.x config.json, tied or not, in three
dtypes; each half reads only its own tensors; a broken checkpoint gets an error that names the problem."""

import json
import mmap
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.checkpoint import LANGUAGE, VISUAL, read_tensors
from common.config import load_config
from llm_worker.model import LanguageModel
from tests.conftest import write_tiny_checkpoint
from visual_worker.vision import VisionTransformer

GRID = [(1, 8, 12)]
PIXELS = torch.randn(96, 1176, generator=torch.Generator().manual_seed(0))
IDS = torch.tensor([[151644, 872, 198, 9707, 1879, 151645]])


def outputs(model_dir, dtype=torch.float32):
    vit = VisionTransformer.from_pretrained(model_dir, dtype=dtype)
    lm = LanguageModel.from_pretrained(model_dir, dtype=dtype)
    S = IDS.shape[1]
    with torch.inference_mode():
        logits = lm(lm.embed(IDS), torch.arange(S).expand(3, 1, S), torch.arange(S)[None], lm.new_cache(1, S))
    return vit.embed(PIXELS, GRID), logits


@pytest.fixture(scope="module")
def published(tiny_model):
    return outputs(tiny_model)


@pytest.mark.parametrize("layout", ["transformers5", "sharded", "flat_config"])
def test_every_layout_loads_to_the_same_model(tmp_path, tokenizer_dir, published, layout):
    model_dir = write_tiny_checkpoint(tmp_path, tokenizer_dir, layout=layout)
    embeds, logits = outputs(model_dir)
    assert torch.equal(embeds, published[0])
    assert torch.equal(logits, published[1])


def test_layouts_really_differ(tmp_path, tokenizer_dir):
    sharded = write_tiny_checkpoint(tmp_path / "s", tokenizer_dir, layout="sharded")
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    t5 = write_tiny_checkpoint(tmp_path / "t5", tokenizer_dir, layout="transformers5")
    names = load_file(t5 / "model.safetensors").keys()
    assert any(n.startswith("model.visual.") for n in names)
    assert any(n.startswith("model.language_model.") for n in names)


def test_flat_and_nested_config_json_read_the_same(tmp_path, tokenizer_dir, tiny_model):
    flat = write_tiny_checkpoint(tmp_path, tokenizer_dir, layout="flat_config")
    assert "text_config" not in json.loads((flat / "config.json").read_text())
    assert load_config(flat).text == load_config(tiny_model).text
    assert load_config(flat).vision == load_config(tiny_model).vision
    assert load_config(tiny_model).text.mrope_section == (2, 3, 3)


def test_each_half_reads_only_its_own_tensors(tmp_path, tokenizer_dir):
    model_dir = write_tiny_checkpoint(tmp_path, tokenizer_dir, layout="transformers5")
    visual = read_tensors(model_dir, VISUAL, torch.float32)
    language = read_tensors(model_dir, LANGUAGE, torch.float32)
    assert visual and all(n.startswith("visual.") for n in visual)
    assert language and not any(n.startswith("visual.") for n in language)
    assert len(visual) + len(language) == len(load_file(model_dir / "model.safetensors"))


def test_tied_embeddings_match_transformers(tmp_path, tokenizer_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model_dir = write_tiny_checkpoint(tmp_path, tokenizer_dir, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(model_dir / "model.safetensors")
    assert load_config(model_dir).text.tie_word_embeddings
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(input_ids=IDS).logits
    assert (outputs(model_dir)[1] - expected).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loads_in_that_dtype_and_tracks_transformers(tiny_model, dtype):
    from transformers import Qwen2_5_VLForConditionalGeneration

    lm = LanguageModel.from_pretrained(tiny_model, dtype=dtype)
    vit = VisionTransformer.from_pretrained(tiny_model, dtype=dtype)
    assert {p.dtype for p in [*lm.parameters(), *vit.parameters()]} == {dtype}
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model, dtype=dtype).eval()
    with torch.no_grad():
        expected_embeds = reference.model.visual(PIXELS, grid_thw=torch.tensor(GRID)).pooler_output
        expected_logits = reference(input_ids=IDS).logits
    embeds, logits = outputs(tiny_model, dtype)
    assert embeds.dtype == dtype
    assert (embeds.float() - expected_embeds.float()).abs().max() < 0.05 * expected_embeds.float().abs().max()
    assert (logits - expected_logits.float()).abs().max() < 0.05 * expected_logits.float().abs().max()


def test_missing_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_config(tmp_path)


def test_wrong_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        load_config(tmp_path)


def test_missing_weights_file_is_named(tmp_path, tiny_model):
    (tmp_path / "config.json").write_text((tiny_model / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        LanguageModel.from_pretrained(tmp_path)


def test_missing_tensor_is_named(tmp_path, tokenizer_dir):
    model_dir = write_tiny_checkpoint(tmp_path, tokenizer_dir)
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["visual.blocks.1.attn.qkv.weight"]
    save_file(tensors, model_dir / "model.safetensors")
    with pytest.raises(KeyError, match="visual.blocks.1.attn.qkv.weight"):
        VisionTransformer.from_pretrained(model_dir)


def test_shape_mismatch_says_expected_and_found(tmp_path, tokenizer_dir):
    model_dir = write_tiny_checkpoint(tmp_path, tokenizer_dir)
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(65)
    save_file(tensors, model_dir / "model.safetensors")
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \[65\], expected \[64\]"):
        LanguageModel.from_pretrained(model_dir)


def test_stacked_projections_name_the_checkpoints_own_tensors(tmp_path, tokenizer_dir):
    """q/k/v and gate/up are stacked at load; a missing or mis-shaped part is named as the checkpoint names it."""
    model_dir = write_tiny_checkpoint(tmp_path, tokenizer_dir)
    tensors = load_file(model_dir / "model.safetensors")
    up = tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.1.mlp.up_proj.weight"] = up[1:].clone()
    save_file(tensors, model_dir / "model.safetensors")
    with pytest.raises(ValueError, match=rf"'model.layers.1.mlp.up_proj.weight' has shape \[{up.shape[0] - 1}, {up.shape[1]}\], "
                                         rf"expected \[{up.shape[0]}, {up.shape[1]}\]"):
        LanguageModel.from_pretrained(model_dir)
    tensors["model.layers.1.mlp.up_proj.weight"] = up
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, model_dir / "model.safetensors")
    with pytest.raises(KeyError, match="model.layers.1.self_attn.k_proj.bias"):
        LanguageModel.from_pretrained(model_dir)


def test_tensors_are_read_exactly_and_a_truncated_file_names_the_tensor(tmp_path):
    stored = {"a.bf16": torch.randn(3, 5).bfloat16(), "a.f16": torch.randn(7).half(), "a.f32": torch.randn(2, 2, 2),
              "a.i64": torch.arange(-3, 3), "a.scalar": torch.tensor(2.5), "a.empty": torch.zeros(0, 4)}
    save_file(stored, tmp_path / "model.safetensors")
    read = read_tensors(tmp_path, "a.", torch.float32)
    assert read.keys() == stored.keys()
    for name, tensor in stored.items():
        expected = tensor.float() if tensor.is_floating_point() else tensor  # integer tensors stay as stored
        assert read[name].dtype == expected.dtype and torch.equal(read[name], expected), name
    data = (tmp_path / "model.safetensors").read_bytes()
    header = json.loads(data[8: 8 + int.from_bytes(data[:8], "little")])
    last = max(stored, key=lambda name: header[name]["data_offsets"][1])
    (tmp_path / "model.safetensors").write_bytes(data[:-4])  # the last tensor in the file loses its last bytes
    with pytest.raises(ValueError, match=f"ends inside tensor '{last}'"):
        read_tensors(tmp_path, "a.", torch.float32)


def test_a_tensor_the_index_lists_but_its_shard_lacks_is_named(tmp_path, tokenizer_dir):
    sharded = write_tiny_checkpoint(tmp_path, tokenizer_dir, layout="sharded")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.extra"] = next(iter(index["weight_map"].values()))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KeyError, match="'model.norm.extra' is listed in model.safetensors.index.json but not in the file"):
        read_tensors(sharded, LANGUAGE, torch.float32)


def file_mappings(file) -> list[tuple[int, int]]:
    """(first, end) addresses of this process's memory mappings of `file`, from /proc/self/maps."""
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(Path(file).resolve()):
            spans.append(tuple(int(address, 16) for address in fields[0].split("-")))
    return spans


@pytest.fixture
def private_model(tiny_model, tmp_path) -> Path:
    """A copy of the tiny checkpoint that no other test's model maps: /proc/self/maps then shows this test's only."""
    return Path(shutil.copytree(tiny_model, tmp_path / "private"))


def test_weights_used_as_stored_are_the_checkpoints_own_pages(private_model):
    """Loading copies only what it changes: q/k/v are stacked from parts that do not lie back to back in the file
    (safetensors orders tensors by name: k_proj, o_proj, q_proj, v_proj), so they are read into a new matrix; gate
    and up do lie back to back, and their stack is the file's pages, as are every other weight."""
    model = LanguageModel.from_pretrained(private_model, torch.float32)
    spans = file_mappings(private_model / "model.safetensors")
    layer = model.model.layers[0]
    as_stored = [model.model.embed_tokens.weight, model.lm_head.weight, model.model.norm.weight,
                 layer.input_layernorm.weight, layer.self_attn.o_proj.weight, layer.mlp.gate_up_proj.weight,
                 layer.mlp.down_proj.weight]
    assert all(any(first <= t.data_ptr() < end for first, end in spans) for t in as_stored)
    assert not any(first <= layer.self_attn.qkv_proj.weight.data_ptr() < end for first, end in spans)
    cast = LanguageModel.from_pretrained(private_model, torch.bfloat16)  # a float32 file read as bfloat16: all copies
    spans = file_mappings(private_model / "model.safetensors")
    assert not any(first <= p.data_ptr() < end for p in cast.parameters() for first, end in spans)


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_the_llm_half_maps_no_page_of_the_file_it_does_not_use(private_model, quantization):
    """Every byte of the checkpoint this process maps after load and a forward belongs to a tensor of the model, up
    to the page at each end of a mapping: not the visual tower, not the q/k/v parts once stacked, not the float
    projections once quantized (each mapping is unmapped when its tensor is freed), so none of it can be resident."""
    model = LanguageModel.from_pretrained(private_model, torch.float32, quantization=quantization)
    S = IDS.shape[1]
    with torch.inference_mode():
        model(model.embed(IDS), torch.arange(S).expand(3, 1, S), torch.arange(S)[None], model.new_cache(1, S))
    spans = file_mappings(private_model / "model.safetensors")
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (*model.parameters(), *model.buffers())}
    for first, end in spans:
        used = sum(nbytes for start, nbytes in storages.items() if first <= start < end)
        assert 0 < used and end - first < used + 2 * mmap.PAGESIZE
