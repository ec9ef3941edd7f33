"""Pixels -> vision-transformer input (resize, normalise, patchify), numerically identical to transformers'
Qwen2VLImageProcessorPil for images and Qwen2VLVideoProcessor (CPU) for videos."""

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class PreprocessConfig:
    min_pixels: int = 56 * 56  # per image, after resize
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2  # a still image is repeated to fill it
    merge_size: int = 2  # merge_size x merge_size patches -> one LLM token
    image_mean: tuple = OPENAI_CLIP_MEAN
    image_std: tuple = OPENAI_CLIP_STD
    video_min_pixels: int = 128 * 28 * 28  # per frame: Qwen2VLVideoProcessor's own defaults, not the image ones
    video_max_pixels: int = 768 * 28 * 28

    @classmethod
    def from_dir(cls, model_dir) -> "PreprocessConfig":
        """Read preprocessor_config.json (transformers 4 layout) or processor_config.json (transformers 5 layout).
        Like transformers, videos take video_preprocessor_config.json if present, else the image settings."""
        model_dir = Path(model_dir)
        nested = _read_json(model_dir / "processor_config.json") or {}
        image = _read_json(model_dir / "preprocessor_config.json") or nested.get("image_processor")
        if image is None:
            raise FileNotFoundError(f"{model_dir / 'preprocessor_config.json'} not found (nor processor_config.json)")
        video = _read_json(model_dir / "video_preprocessor_config.json") or nested.get("video_processor") or image
        fields, video_fields = _config_fields(image), _config_fields(video)
        return cls(**fields, video_min_pixels=video_fields.get("min_pixels", cls.video_min_pixels),
                   video_max_pixels=video_fields.get("max_pixels", cls.video_max_pixels))


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _config_fields(raw: dict) -> dict:
    size = raw.get("size") or {}  # top-level min_pixels/max_pixels win over size, as in transformers' __init__
    fields = {"min_pixels": raw.get("min_pixels", size.get("shortest_edge")),
              "max_pixels": raw.get("max_pixels", size.get("longest_edge")),
              **{k: raw.get(k) for k in ("patch_size", "temporal_patch_size", "merge_size")},
              **{k: tuple(raw[k]) for k in ("image_mean", "image_std") if k in raw}}
    return {k: v for k, v in fields.items() if v is not None}


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Both sides to multiples of factor, area within [min_pixels, max_pixels], aspect ratio kept as far as possible."""
    if height < 1 or width < 1:
        raise ValueError(f"image has no pixels: {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.2f} ({width}x{height}) is over "
                         f"the {MAX_ASPECT_RATIO}:1 the model accepts; crop or pad it")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def load_image(source) -> Image.Image:
    """Path (str or Path), data:...;base64 URI, encoded bytes, PIL image or uint8 array (HxW, or HxWxC, C in 1, 3, 4)
    -> PIL image. Encoded sources are decoded fully and turned upright by their EXIF orientation."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return _image_from_array(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(bytes(source), "bytes")
    if isinstance(source, str) and source.startswith("data:"):
        header, _, payload = source.partition(",")
        if not header.endswith(";base64"):
            raise ValueError(f"data URI must be base64 (data:image/<type>;base64,...), got header {header[:60]!r}")
        try:
            data = base64.b64decode(payload)
        except binascii.Error as e:
            raise ValueError(f"data URI payload is not valid base64: {e}") from e
        return _decode(data, "data URI")
    if isinstance(source, (str, Path)):
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read image file {str(source)[:200]!r} (nor a data: URI): {e.strerror}") from e
        return _decode(data, str(source))
    raise TypeError(f"cannot load an image from {type(source).__name__}: "
                    "expected a path, data URI, bytes, PIL image or uint8 numpy array")


def _decode(data: bytes, origin: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # Image.open is lazy: truncated or corrupt pixel data only fails here
            return ImageOps.exif_transpose(image)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise ValueError(f"cannot decode image from {origin} ({len(data)} bytes): {e}") from e


def _image_from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or array.ndim == 3 and array.shape[-1] in (3, 4)):
        raise ValueError(f"image arrays must be HxW or HxWxC with C in (1, 3, 4), got shape {array.shape}")
    return Image.fromarray(array)  # mode L, RGB or RGBA


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB as transformers converts it: transparency (an A band or a transparent palette entry) is
    composited onto white; PIL clips I, I;16 and F values to 0..255 rather than rescaling them."""
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        return image.convert("RGB")
    except ValueError as e:
        raise ValueError(f"cannot convert a {image.mode} image to RGB: {e}") from e


def _pixel_limits(min_pixels: int | None, max_pixels: int | None, default_min: int, default_max: int):
    lo = default_min if min_pixels is None else min_pixels
    hi = default_max if max_pixels is None else max_pixels
    if not 0 < lo <= hi:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got min_pixels={lo}, max_pixels={hi}")
    return lo, hi


def _normalise(pixels: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """uint8 [..., C] -> float32 [..., C] by table lookup: lut[c, value]."""
    return np.take(lut.ravel(), pixels + np.arange(lut.shape[0], dtype=np.int16) * lut.shape[1])


def _patchify(frames: np.ndarray, config: PreprocessConfig) -> tuple[np.ndarray, list[int]]:
    """float32 frames [T, H, W, C] -> [grid_t*grid_h*grid_w, C*tp*p*p] in transformers' order, and [t, h, w]."""
    p, m, tp = config.patch_size, config.merge_size, config.temporal_patch_size
    if pad := -len(frames) % tp:  # the last frame is repeated to fill the last temporal patch
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    t, h, w, c = frames.shape
    gt, gh, gw = t // tp, h // p, w // p
    x = frames.reshape(gt, tp, gh // m, m, p, gw // m, m, p, c)
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)  # (gt, gh/m, gw/m, m, m, C, tp, p, p): each merge group contiguous
    return x.reshape(gt * gh * gw, c * tp * p * p), [gt, gh, gw]


def _image_lut(config: PreprocessConfig) -> np.ndarray:
    """[3, 256] float32, bit-exact with transformers' PIL path: x * (1/255) in float64 -> float32, then (x - mean) / std
    in float32."""
    mean, std = np.asarray(config.image_mean, np.float32)[:, None], np.asarray(config.image_std, np.float32)[:, None]
    return ((np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32) - mean) / std


def _video_lut(config: PreprocessConfig) -> np.ndarray:
    """[3, 256] float32, bit-exact with transformers' fused video path: (x - 255*mean) / (255*std) in float32."""
    mean, std = np.asarray(config.image_mean, np.float32)[:, None], np.asarray(config.image_std, np.float32)[:, None]
    return (np.arange(256, dtype=np.float32) - mean * np.float32(255)) / (std * np.float32(255))


def preprocess_images(images: list, config: PreprocessConfig, min_pixels: int | None = None,
                      max_pixels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (anything load_image takes) -> pixel_values float32 [N_patches, 3*T*p*p], grid_thw int64 [n_images, 3].
    min_pixels/max_pixels override the config's for this request."""
    if len(images) == 0:
        raise ValueError("no images given")
    lo, hi = _pixel_limits(min_pixels, max_pixels, config.min_pixels, config.max_pixels)
    lut, factor = _image_lut(config), config.patch_size * config.merge_size
    all_patches, grids = [], []
    for source in images:
        rgb = _to_rgb(load_image(source))
        h, w = smart_resize(rgb.height, rgb.width, factor, lo, hi)
        pixels = np.asarray(rgb.resize((w, h), Image.BICUBIC))  # [h, w, 3] uint8, PIL bicubic as transformers
        frames = np.broadcast_to(_normalise(pixels, lut), (config.temporal_patch_size, h, w, 3))  # T copies
        patches, grid = _patchify(frames, config)
        all_patches.append(patches)
        grids.append(grid)
    return np.concatenate(all_patches), np.array(grids, dtype=np.int64)


def preprocess_video(frames: list, fps: float, config: PreprocessConfig, min_pixels: int | None = None,
                     max_pixels: int | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Frames of one video, sampled at fps -> pixel_values float32 [N_patches, 3*T*p*p], grid_thw int64 [1, 3] and
    second_per_grid_t (seconds of video per temporal patch, for M-RoPE). Limits default to the video ones, per frame."""
    if len(frames) == 0:
        raise ValueError("a video needs at least one frame")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    lo, hi = _pixel_limits(min_pixels, max_pixels, config.video_min_pixels, config.video_max_pixels)
    rgb = [np.asarray(_to_rgb(load_image(frame))) for frame in frames]
    if len({frame.shape for frame in rgb}) > 1:
        raise ValueError(f"all frames of a video must have one size, got {sorted({f.shape[1::-1] for f in rgb})} (WxH)")
    video = torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2).contiguous()  # [T, 3, H, W] uint8
    h, w = smart_resize(video.shape[2], video.shape[3], config.patch_size * config.merge_size, lo, hi)
    if (h, w) != tuple(video.shape[2:]):
        # transformers resizes videos with torchvision, which on CPU runs torch's own uint8 antialiased bicubic:
        # not PIL's, so frames differ from the same picture given as an image
        video = F.interpolate(video, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    patches, grid = _patchify(_normalise(video.permute(0, 2, 3, 1).numpy(), _video_lut(config)), config)
    return patches, np.array([grid], dtype=np.int64), config.temporal_patch_size / fps
