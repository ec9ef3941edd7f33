"""The options every entry point shares (launch.py and its subcommands, `python -m visual_worker`, `python -m
llm_worker`), declared once: each field of `Options` is one command-line flag, parsed the same way everywhere and
passed on to worker processes by `Options.argv`."""

import argparse
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from common.config import DTYPES

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "examples" / "model"


@dataclass(frozen=True)
class Options:
    model: Path = field(default=DEFAULT_MODEL, metadata={
        "help": "checkpoint directory in Hugging Face layout (default: the embedded demo model)", "type": Path})
    dtype: str | None = field(default=None, metadata={
        "help": "float32, bfloat16 or float16 (default: the checkpoint's own)", "choices": sorted(DTYPES)})
    quantization: str | None = field(default=None, metadata={
        "help": "the LLM worker's decoder weights, quantized at load: int8 (one scale per output channel) or int4 "
                "(groups of 128); an AWQ checkpoint is int4 without it", "choices": ["int8", "int4"]})
    tp: int = field(default=1, metadata={
        "help": "tensor parallelism: the LLM worker splits its decoder's heads, MLP and KV cache over this many "
                "ranks, one process each (rank r on cuda:N+r when --device is cuda:N)", "type": int})
    visual_workers: int = field(default=1, metadata={
        "help": "visual worker processes to start (0: only workers started by hand join)", "type": int})
    llm_workers: int = field(default=1, metadata={"help": "LLM worker processes to start, as --visual-workers",
                                                  "type": int})
    visual_devices: str = field(default="cpu", metadata={
        "help": "the visual workers' devices, comma-separated (cpu, cuda:N), taken in turn: cpu,cuda:0"})
    llm_devices: str = field(default="cpu", metadata={"help": "the LLM workers' devices, as --visual-devices"})
    chunk_width: int = field(default=640, metadata={
        "help": "image_embeds travel split along the hidden dimension into chunks this wide", "type": int})
    max_batch: int = field(default=8, metadata={"help": "requests the LLM worker decodes together", "type": int})
    max_model_len: int = field(default=4096, metadata={
        "help": "tokens per request, prompt and output together (the KV cache holds max-batch of them)", "type": int})
    prefill_chunk: int = field(default=512, metadata={
        "help": "a prompt longer than this is prefilled this many tokens at a time, a decode step of the running "
                "requests between chunks, so a long new prompt does not stall them (0: whole prompts)", "type": int})
    max_image_pixels: int = field(default=64 * 2**20, metadata={
        "help": "largest image, in decoded pixels, the visual worker opens (bigger ones are refused unread)",
        "type": int})
    min_pixels: int | None = field(default=None, metadata={
        "help": "smallest resized image area (Qwen's min_pixels; default: the checkpoint's preprocessor_config.json); "
                "a request's mm_processor_kwargs override it", "type": int})
    max_pixels: int | None = field(default=None, metadata={
        "help": "largest resized image area (Qwen's max_pixels; default: the checkpoint's): bounds an image's tokens",
        "type": int})
    encoder_cache_mb: int = field(default=256, metadata={
        "help": "MiB of image embeddings the visual worker keeps, by image bytes and pixel limits, least recently used "
                "evicted (0: none); a repeated image skips the ViT", "type": int})
    transport: str = field(default="ipc", metadata={
        "help": "sockets between the processes: ipc (a private folder) or tcp (127.0.0.1)", "choices": ["ipc", "tcp"]})
    frontend_host: str = field(default="127.0.0.1", metadata={
        "help": "with --transport tcp: the address the front end's sockets bind to (workers on other hosts connect)"})
    frontend_ports: str | None = field(default=None, metadata={
        "help": "with --transport tcp: requests,results,control ports of the front end (default: free ones), for "
                "workers started by hand: python -m visual_worker --requests tcp://HOST:P1 --results tcp://HOST:P2 "
                "--control tcp://HOST:P3"})
    curve_keys: Path | None = field(default=None, metadata={
        "help": "a folder made by `launch.py keys`: encrypt and authenticate every socket with ZeroMQ CURVE (for tcp "
                "endpoints across hosts)", "type": Path})
    visual_backend: str = field(default="torch", metadata={
        "help": "how the visual worker runs the ViT: torch (eager) or tvm (compiled for fixed patch buckets, cached on "
                "disk; see `launch.py compile`)", "choices": ["torch", "tvm"]})
    patch_buckets: str = field(default="1024,4096,5120", metadata={
        "help": "with --visual-backend tvm: the patch counts the ViT is compiled for, each a multiple of 16; a "
                "request's images go through the smallest that holds them"})

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
        """Adds the flags of the named fields (default: all) to the parser."""
        for f in fields(cls):
            if names is None or f.name in names:
                parser.add_argument("--" + f.name.replace("_", "-"), default=f.default, **f.metadata)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Options":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def argv(self, names: tuple[str, ...]) -> list[str]:
        """The named fields as flags for a worker's command line (unset ones left out)."""
        values = asdict(self)
        out = []
        for name in names:
            if values[name] is not None:
                out += ["--" + name.replace("_", "-"), str(values[name])]
        return out

    def check(self) -> None:
        """Values argparse cannot check on its own; a ValueError says which flag is wrong."""
        for name in ("chunk_width", "max_batch", "max_model_len", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("min_pixels", "max_pixels"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"--min-pixels {self.min_pixels} is above --max-pixels {self.max_pixels}")
        for name in ("visual_workers", "llm_workers", "encoder_cache_mb", "prefill_chunk"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 0, got {getattr(self, name)}")
        if self.frontend_ports is not None:
            ports = self.frontend_ports.split(",")
            if self.transport != "tcp" or len(ports) != 3 or not all(p.isdigit() and 0 < int(p) < 65536 for p in ports):
                raise ValueError("--frontend-ports takes three tcp ports, requests,results,control, with --transport "
                                 f"tcp; got {self.frontend_ports!r}")
        if self.tp < 1:
            raise ValueError(f"--tp must be at least 1, got {self.tp}")
        parse_patch_buckets(self.patch_buckets)
        for role in ("visual", "llm"):
            bad = [d for d in self.devices(role) if not re.fullmatch(r"cpu|cuda(:\d+)?", d)]
            if bad:
                raise ValueError(f"--{role}-devices takes cpu or cuda:N, comma-separated; got {', '.join(bad)}")

    def devices(self, role: str) -> list[str]:
        """The devices of the role's workers, one per worker, the list taken in turn."""
        listed = [d.strip() for d in getattr(self, f"{role}_devices").split(",")]
        return [listed[i % len(listed)] for i in range(getattr(self, f"{role}_workers"))]


def parse_patch_buckets(text: str) -> list[int]:
    """'1024,4096,5120' → [1024, 4096, 5120], sorted; a ValueError unless each is a positive multiple of 16."""
    parts = text.split(",")
    if not all(p.strip().isdigit() and int(p) >= 16 and int(p) % 16 == 0 for p in parts):
        raise ValueError(f"--patch-buckets takes comma-separated patch counts, each a positive multiple of 16 "
                         f"(like 1024,4096,5120), got {text!r}")
    return sorted({int(p) for p in parts})


VISUAL_OPTIONS = ("model", "dtype", "chunk_width", "max_image_pixels", "min_pixels", "max_pixels", "encoder_cache_mb",
                  "curve_keys",
                  "visual_backend", "patch_buckets")  # what the visual worker takes
LLM_OPTIONS = ("model", "dtype", "quantization", "tp", "max_batch", "max_model_len", "prefill_chunk", "curve_keys")
