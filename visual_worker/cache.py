"""The encoder cache: image embeddings kept by a digest of the image's bytes and of the pixel limits that shaped them
(one worker serves one model), least recently used evicted past a byte budget. A hit skips decoding, preprocessing
and the ViT for that image, as vLLM's and SGLang's encoder caches do."""

import hashlib
from collections import OrderedDict

from torch import Tensor


class EncoderCache:
    def __init__(self, budget_bytes: int):
        self.budget, self.bytes = budget_bytes, 0
        self.entries: OrderedDict[bytes, tuple[Tensor, tuple[int, int, int]]] = OrderedDict()

    @staticmethod
    def key(data: bytes, min_pixels: int | None, max_pixels: int | None) -> bytes:
        digest = hashlib.sha256(data)
        digest.update(f"|{min_pixels}|{max_pixels}".encode())
        return digest.digest()

    def get(self, key: bytes) -> tuple[Tensor, tuple[int, int, int]] | None:
        """→ (embeds (rows, hidden), grid_thw) of a cached image, now the most recently used, or None."""
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def put(self, key: bytes, embeds: Tensor, grid: tuple[int, int, int]) -> None:
        size = embeds.numel() * embeds.element_size()
        if size > self.budget or key in self.entries:
            return
        self.entries[key] = (embeds, grid)
        self.bytes += size
        while self.bytes > self.budget:
            _, (old, _) = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
