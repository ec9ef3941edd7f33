"""visual_worker.preprocess against transformers: Qwen2VLImageProcessorPil for images, and for videos a transcription
of Qwen2VLVideoProcessor (it imports torchvision, which this environment cannot install)."""

import base64
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
from transformers.video_processing_utils import BaseVideoProcessor

from visual_worker.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PreprocessConfig,
    load_image,
    preprocess_images,
    preprocess_video,
    smart_resize,
)

CONFIG = PreprocessConfig()  # the processors' class defaults: images 3136..1003520 px, video frames 100352..602112 px
PUBLISHED = {  # preprocessor_config.json of the published Qwen2.5-VL checkpoints
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}


@pytest.fixture(scope="module")
def hf():
    return Qwen2VLImageProcessorPil()


def random_pixels(height, width, channels=3, seed=0) -> np.ndarray:
    shape = (height, width) if channels is None else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def random_image(height, width, seed=0) -> Image.Image:
    return Image.fromarray(random_pixels(height, width, seed=seed))


def assert_same_as_transformers(hf, images, ours=None, size=None, min_pixels=None, max_pixels=None):
    """ours: what preprocess_images gets when transformers cannot take the same object (defaults to images)."""
    ref = hf(images=images, return_tensors="np", **({"size": size} if size else {}))
    pixel_values, grid_thw = preprocess_images(images if ours is None else ours, CONFIG, min_pixels, max_pixels)
    np.testing.assert_array_equal(grid_thw, ref["image_grid_thw"])
    assert pixel_values.dtype == np.float32 and pixel_values.shape == ref["pixel_values"].shape
    assert np.abs(pixel_values - ref["pixel_values"]).max() <= 1e-6
    return pixel_values, grid_thw


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --- images: sizes -------------------------------------------------------------------------------------------------

def test_720p_becomes_728x1288_that_is_52x92_patches_and_1196_tokens(hf):
    assert smart_resize(720, 1280) == (728, 1288)  # 720/28 = 25.7 -> 26 * 28; 1280/28 = 45.7 -> 46 * 28
    pixel_values, grid_thw = assert_same_as_transformers(hf, [random_image(720, 1280)])
    assert grid_thw.tolist() == [[1, 52, 92]]
    assert pixel_values.shape == (52 * 92, 3 * 2 * 14 * 14) == (4784, 1176)
    assert grid_thw.prod() // 4 == 1196  # tokens after the 2x2 merge


@pytest.mark.parametrize("height, width", [
    (10, 10),  # below min_pixels: scaled up to 56x56
    (3000, 4000),  # past max_pixels: scaled down to 840x1148
    (30, 2000),  # extreme aspect ratios
    (1500, 40),
    (10, 2000),  # aspect ratio exactly 200 is still accepted; the short side rounds to 0 before the min_pixels fix
    (56, 56),  # exact multiples of 28 are not resampled in size
    (280, 532),
    (333, 517),  # odd sizes
    (720, 1280),
])
def test_image_sizes_match_transformers(hf, height, width):
    assert_same_as_transformers(hf, [random_image(height, width, seed=height * width)])


def test_smart_resize_matches_transformers_on_random_sizes_and_limits():
    rng = np.random.default_rng(1)
    for _ in range(3000):
        height, width = (int(v) for v in rng.integers(1, 5000, 2))
        if max(height, width) / min(height, width) > 200:
            continue
        lo = int(rng.choice([3136, 100352, 256 * 28 * 28]))
        hi = int(rng.choice([lo, 602112, 1003520, 12845056]))
        assert smart_resize(height, width, 28, lo, hi) == hf_smart_resize(height, width, 28, lo, hi)


def test_aspect_ratio_over_200_is_rejected_with_the_ratio_named():
    with pytest.raises(ValueError, match=r"aspect ratio 200\.10 \(2001x10\)"):
        smart_resize(10, 2001)
    with pytest.raises(ValueError, match="aspect ratio"):
        preprocess_images([random_pixels(5, 1100)], CONFIG)


def test_several_images_are_concatenated_in_order(hf):
    assert_same_as_transformers(hf, [random_image(333, 517, seed=1), random_image(56, 56, seed=2),
                                     random_image(100, 900, seed=3)])


# --- images: per-request pixel limits ------------------------------------------------------------------------------

@pytest.mark.parametrize("min_pixels, max_pixels", [(256 * 28 * 28, 1280 * 28 * 28), (3136, 200 * 28 * 28),
                                                    (3136, 12845056)])
def test_min_max_pixels_per_request_match_transformers_size_kwarg(hf, min_pixels, max_pixels):
    image = random_image(900, 1500, seed=4)
    assert_same_as_transformers(hf, [image], size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
                                min_pixels=min_pixels, max_pixels=max_pixels)


def test_min_pixels_above_max_pixels_is_rejected():
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        preprocess_images([random_image(56, 56)], CONFIG, min_pixels=10_000, max_pixels=5_000)


# --- images: colour modes and arrays -------------------------------------------------------------------------------

def palette_with_transparency() -> Image.Image:
    image = random_image(61, 83, seed=5).convert("P")
    image.info["transparency"] = int(np.asarray(image)[0, 0])  # a transparent palette entry, as PNG/GIF decode it
    return image


MODES = {  # transformers composites anything with an A band or a transparent palette entry onto white
    "L": lambda rgb, rgba: rgb.convert("L"),
    "1": lambda rgb, rgba: rgb.convert("1"),
    "P": lambda rgb, rgba: rgb.convert("P"),
    "P+transparency": lambda rgb, rgba: palette_with_transparency(),
    "PA": lambda rgb, rgba: rgba.convert("PA"),
    "LA": lambda rgb, rgba: rgba.convert("LA"),
    "RGBA": lambda rgb, rgba: rgba,
    "RGBa": lambda rgb, rgba: rgba.convert("RGBa"),  # premultiplied: lowercase a, so no compositing
    "RGBX": lambda rgb, rgba: rgb.convert("RGBX"),
    "CMYK": lambda rgb, rgba: rgb.convert("CMYK"),
    "YCbCr": lambda rgb, rgba: rgb.convert("YCbCr"),
    "HSV": lambda rgb, rgba: rgb.convert("HSV"),
    "LAB": lambda rgb, rgba: rgb.convert("LAB"),
    # 32/16-bit and float modes are clipped to 0..255, not rescaled: a real 16-bit scan comes out mostly white
    "I": lambda rgb, rgba: Image.fromarray(np.random.default_rng(6).integers(-500, 70000, (61, 83), dtype=np.int32)),
    "I;16": lambda rgb, rgba: Image.fromarray(np.random.default_rng(7).integers(0, 65536, (61, 83), dtype=np.uint16)),
    "F": lambda rgb, rgba: Image.fromarray(np.random.default_rng(8).uniform(-50, 300, (61, 83)).astype(np.float32)),
}


@pytest.mark.parametrize("mode", MODES)
def test_pil_mode_is_converted_like_transformers(hf, mode):
    image = MODES[mode](random_image(61, 83, seed=9), Image.fromarray(random_pixels(61, 83, 4, seed=10)))
    assert image.mode == mode.split("+")[0]
    assert_same_as_transformers(hf, [image])


def test_mode_transformers_cannot_convert_gives_a_clear_error(hf):
    image = Image.fromarray(random_pixels(61, 83, 4)).convert("La")
    with pytest.raises(ValueError):
        hf(images=[image], return_tensors="np")
    with pytest.raises(ValueError, match="cannot convert a La image to RGB"):
        preprocess_images([image], CONFIG)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_uint8_hwc_arrays_match_transformers(hf, channels):
    assert_same_as_transformers(hf, [random_pixels(77, 129, channels, seed=channels)])


def test_hw_array_is_grayscale(hf):
    """transformers rejects 2-D arrays; the same pixels as HxWx1 are the reference."""
    pixels = random_pixels(77, 129, channels=None)
    assert_same_as_transformers(hf, [pixels[..., None]], ours=[pixels])


@pytest.mark.parametrize("array, problem", [(np.zeros((20, 20, 3), np.float32), "must be uint8"),
                                            (np.zeros((20, 20, 2), np.uint8), "got shape"),
                                            (np.zeros((2, 20, 20, 3), np.uint8), "got shape")])
def test_unusable_arrays_are_rejected(array, problem):
    with pytest.raises(ValueError, match=problem):
        load_image(array)


# --- images: encoded sources ---------------------------------------------------------------------------------------

def test_bytes_data_uri_and_paths_decode_to_the_same_pixels(tmp_path):
    image = random_image(45, 67)
    encoded = png_bytes(image)
    (tmp_path / "a.png").write_bytes(encoded)
    sources = [encoded, bytearray(encoded), "data:image/png;base64," + base64.b64encode(encoded).decode(),
               str(tmp_path / "a.png"), tmp_path / "a.png"]
    for source in sources:
        np.testing.assert_array_equal(np.asarray(load_image(source)), np.asarray(image))


def test_encoded_png_with_transparency_matches_transformers_on_the_decoded_image(hf):
    decoded = Image.open(io.BytesIO(png_bytes(palette_with_transparency())))
    assert decoded.mode == "P" and "transparency" in decoded.info
    assert_same_as_transformers(hf, [decoded], ours=[png_bytes(palette_with_transparency())])


def test_encoded_image_is_turned_upright_by_its_exif_orientation():
    buffer, exif = io.BytesIO(), Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    random_image(40, 100).save(buffer, format="JPEG", exif=exif)
    assert load_image(buffer.getvalue()).size == (40, 100)  # (width, height): now portrait


@pytest.mark.parametrize("source, problem", [
    (b"definitely not an image", "cannot decode image from bytes"),
    (png_bytes(random_image(200, 200))[:400], "cannot decode image from bytes"),  # truncated
    ("data:image/png;base64," + base64.b64encode(b"\x89PNG garbage").decode(), "cannot decode image from data URI"),
    ("data:image/png;base64,abc", "not valid base64"),
    ("data:image/png,rawdata", "must be base64"),
    ("/no/such/image.png", "cannot read image file '/no/such/image.png'"),
    ("iVBORw0KGgo" * 50, "cannot read image file"),  # bare base64 is not taken for an image
])
def test_unreadable_sources_raise_value_error_saying_what_was_wrong(source, problem):
    with pytest.raises(ValueError, match=problem):
        load_image(source)


def test_unsupported_source_type_is_a_type_error():
    with pytest.raises(TypeError, match="cannot load an image from int"):
        load_image(42)


# --- config --------------------------------------------------------------------------------------------------------

def test_from_dir_reads_the_published_preprocessor_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(PUBLISHED))
    config = PreprocessConfig.from_dir(tmp_path)
    size = Qwen2VLImageProcessorPil.from_pretrained(tmp_path).size
    assert (config.min_pixels, config.max_pixels) == (size.shortest_edge, size.longest_edge) == (3136, 12845056)
    assert (config.patch_size, config.temporal_patch_size, config.merge_size) == (14, 2, 2)
    assert config.image_mean == OPENAI_CLIP_MEAN and config.image_std == OPENAI_CLIP_STD


def test_from_dir_video_limits_fall_back_to_the_image_file_like_transformers(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(PUBLISHED))
    video_dict, _ = BaseVideoProcessor.get_video_processor_dict(tmp_path)  # no video_preprocessor_config.json
    assert (video_dict["min_pixels"], video_dict["max_pixels"]) == (3136, 12845056)
    config = PreprocessConfig.from_dir(tmp_path)
    assert (config.video_min_pixels, config.video_max_pixels) == (3136, 12845056)
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"min_pixels": 1000, "max_pixels": 9000}))
    config = PreprocessConfig.from_dir(tmp_path)
    assert (config.video_min_pixels, config.video_max_pixels, config.max_pixels) == (1000, 9000, 12845056)


def test_from_dir_reads_size_and_lets_min_max_pixels_win_like_transformers(tmp_path):
    raw = {"size": {"shortest_edge": 1000, "longest_edge": 5000}, "max_pixels": 9000}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(raw))
    size = Qwen2VLImageProcessorPil.from_pretrained(tmp_path).size
    config = PreprocessConfig.from_dir(tmp_path)
    assert (config.min_pixels, config.max_pixels) == (size.shortest_edge, size.longest_edge) == (1000, 9000)


def test_from_dir_reads_transformers5_processor_config(tmp_path):
    nested = {"image_processor": {"size": {"shortest_edge": 3136, "longest_edge": 12845056}},
              "video_processor": {"size": {"shortest_edge": 100352, "longest_edge": 602112}}}
    (tmp_path / "processor_config.json").write_text(json.dumps(nested))
    config = PreprocessConfig.from_dir(tmp_path)
    assert (config.min_pixels, config.max_pixels, config.video_min_pixels, config.video_max_pixels) == (
        3136, 12845056, 100352, 602112)


def test_from_dir_without_config_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "preprocessor_config.json")):
        PreprocessConfig.from_dir(tmp_path)


# --- video ---------------------------------------------------------------------------------------------------------

def transformers_video(frames: np.ndarray, min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28):
    """Qwen2VLVideoProcessor._preprocess (transformers 5.24, models/qwen2_vl/video_processing_qwen2_vl.py) for one
    video of uint8 frames [T, H, W, 3], transcribed because it imports torchvision. Defaults are the class's size.
    - _prepare_input_videos: torch.from_numpy(...).contiguous(), permute to [T, C, H, W]
    - resize: smart_resize(factor=28), then tvF.resize(BICUBIC, antialias=True), which torchvision's resize_image
      runs on CPU as F.interpolate on the uint8 tensor itself (_do_native_uint8_resize_on_cpu is True for bicubic),
      and skips when the size is unchanged; cap_pixels_per_frame is off by default
    - rescale_and_normalize: mean and std multiplied by 1/rescale_factor, then tvF.normalize: sub, div in float32
    - patchify: last frame repeated to a multiple of temporal_patch_size, view + permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    """
    video = torch.from_numpy(frames).contiguous().permute(0, 3, 1, 2).contiguous()[None]  # [B, T, C, H, W]
    height, width = video.shape[-2:]
    new_h, new_w = hf_smart_resize(height, width, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
    if (new_h, new_w) != (height, width):
        resized = F.interpolate(video.reshape(-1, 3, height, width), size=[new_h, new_w], mode="bicubic",
                                align_corners=False, antialias=True)
        video = resized.reshape(1, -1, 3, new_h, new_w)
    mean = (torch.tensor(OPENAI_CLIP_MEAN) * (1.0 / (1 / 255))).view(-1, 1, 1)
    std = (torch.tensor(OPENAI_CLIP_STD) * (1.0 / (1 / 255))).view(-1, 1, 1)
    video = video.to(torch.float32).sub_(mean).div_(std)
    batch, num_frames, channel = video.shape[:3]
    if pad := -num_frames % 2:
        video = torch.cat((video, video[:, -1:].expand(-1, pad, -1, -1, -1)), dim=1)
        num_frames += pad
    grid_t, grid_h, grid_w = num_frames // 2, new_h // 14, new_w // 14
    patches = video.view(batch, grid_t, 2, channel, grid_h // 2, 2, 14, grid_w // 2, 2, 14)
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return patches.reshape(grid_t * grid_h * grid_w, channel * 2 * 14 * 14).numpy(), [[grid_t, grid_h, grid_w]]


def random_video(num_frames, height, width, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("num_frames, height, width", [
    (4, 240, 320),  # scaled up to the video min_pixels (100352)
    (5, 240, 320),  # odd frame count: the last frame is repeated
    (1, 200, 180),
    (3, 720, 1280),  # scaled down to the video max_pixels (602112)
    (2, 336, 336),  # already a valid size: not resampled
])
def test_video_frames_match_transformers_video_processor(num_frames, height, width):
    frames = random_video(num_frames, height, width, seed=num_frames * height)
    ref_pixels, ref_grid = transformers_video(frames)
    pixel_values, grid_thw, _ = preprocess_video(list(frames), 2.0, CONFIG)
    assert grid_thw.dtype == np.int64 and grid_thw.tolist() == ref_grid
    assert pixel_values.dtype == np.float32 and pixel_values.shape == ref_pixels.shape
    assert np.abs(pixel_values - ref_pixels).max() <= 1e-6


def test_video_uses_the_video_processor_pixel_limits_not_the_image_ones():
    _, grid_thw, _ = preprocess_video(list(random_video(4, 720, 1280)), 2.0, CONFIG)
    assert grid_thw.tolist() == [[2, 40, 72]]  # 560x1008 under 602112 px per frame; as an image it would be 52x92
    _, grid_thw, _ = preprocess_video(list(random_video(2, 64, 64)), 2.0, CONFIG)
    assert grid_thw.tolist() == [[1, 24, 24]]  # 336x336 over 100352 px per frame; as an image it would be 4x4


def test_video_pixel_limits_per_request():
    frames = random_video(2, 720, 1280)
    ref_pixels, ref_grid = transformers_video(frames, min_pixels=3136, max_pixels=200 * 28 * 28)
    pixel_values, grid_thw, _ = preprocess_video(list(frames), 2.0, CONFIG, min_pixels=3136, max_pixels=200 * 28 * 28)
    assert grid_thw.tolist() == ref_grid and np.abs(pixel_values - ref_pixels).max() <= 1e-6


def test_odd_frame_count_repeats_the_last_frame_in_the_last_temporal_patch():
    frames = random_video(3, 336, 336)
    pixel_values, grid_thw, _ = preprocess_video(list(frames), 2.0, CONFIG)
    assert grid_thw.tolist() == [[2, 24, 24]]
    last = pixel_values[24 * 24:].reshape(-1, 3, 2, 14 * 14)  # [patches of grid_t=1, C, T, p*p]
    np.testing.assert_array_equal(last[:, :, 0], last[:, :, 1])


def test_video_frames_are_resized_by_torch_not_pil_so_they_differ_from_the_same_image():
    frames = random_video(2, 240, 320)
    video_pixels, video_grid, _ = preprocess_video(list(frames), 2.0, CONFIG)
    image_pixels, image_grid = preprocess_images([frames[0]], CONFIG, min_pixels=128 * 28 * 28)
    assert video_grid[0, 1:].tolist() == image_grid[0, 1:].tolist()
    assert np.abs(video_pixels - image_pixels).max() > 0.01  # bicubic kernels disagree by whole uint8 steps


@pytest.mark.parametrize("fps, expected", [(2.0, 1.0), (24.0, 1 / 12), (0.5, 4.0)])
def test_second_per_grid_t_is_temporal_patch_size_over_fps(fps, expected):
    assert preprocess_video(list(random_video(2, 56, 56)), fps, CONFIG)[2] == pytest.approx(expected)


def test_video_frames_of_different_sizes_are_rejected():
    with pytest.raises(ValueError, match="one size"):
        preprocess_video([random_pixels(56, 56), random_pixels(56, 84)], 2.0, CONFIG)


def test_video_needs_positive_fps():
    with pytest.raises(ValueError, match="fps must be positive"):
        preprocess_video([random_pixels(56, 56)], 0, CONFIG)
