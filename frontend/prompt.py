"""The one request builder: chat messages with their media → a Request for the visual worker. The chat template is
rendered and tokenized here (text a client typed stays text), each image or video leaves one pad in the prompt, and
the media travel as they are: images as their encoded bytes, videos as sampled frames.

A message is {"role": ..., "content": str | [part, ...]}; a part is {"type": "text", "text": str},
{"type": "image", "data": bytes} or {"type": "video", "frames": uint8 array (T, H, W, 3), "fps": float}.
"""

import uuid

import numpy as np
import torch

from common.messages import Blob, Image, PixelLimits, Request, SamplingParams, Video
from common.tokenizer import Tokenizer


class Prompter:
    def __init__(self, model_dir, context_len: int):
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.context_len = context_len  # the LLM worker's tokens per request, prompt and output

    def request(self, messages: list[dict], sampling: SamplingParams, pixels: PixelLimits = PixelLimits(),
                request_id: str | None = None, tools: list[dict] | None = None) -> Request:
        template, media = [], []
        for m in messages:
            content = m["content"]
            if isinstance(content, list):
                content = [self._part(p, media) for p in content]
            template.append({**m, "content": content})
        ids = self.tokenizer.encode_chat(template, tools=tools)
        text_len = len(ids) - len(media)
        if text_len + 1 > self.context_len:
            raise ValueError(f"the prompt is {text_len} tokens before its images and videos, which leaves no room in "
                             f"a context of {self.context_len} tokens")
        return Request(request_id or uuid.uuid4().hex, ids, media, sampling, pixels,
                       max_prompt_tokens=self.context_len - 1)

    def tokens_request(self, ids: list[int], sampling: SamplingParams, request_id: str) -> Request:
        """A prompt given as it is (token ids, no chat template) → a Request with no media."""
        if len(ids) + 1 > self.context_len:
            raise ValueError(f"the prompt is {len(ids)} tokens, which leaves no room in a context of "
                             f"{self.context_len} tokens")
        if max(ids) >= self.tokenizer.vocab_size:
            raise ValueError(f"token {max(ids)} is past this model's vocabulary of {self.tokenizer.vocab_size}")
        return Request(request_id, ids, [], sampling, max_prompt_tokens=self.context_len - 1)

    @staticmethod
    def _part(part: dict, media: list) -> dict:
        if part["type"] == "image":
            media.append(Image(Blob(part["data"])))
            return {"type": "image"}
        if part["type"] == "video":
            frames = np.ascontiguousarray(part["frames"], dtype=np.uint8)
            media.append(Video(torch.from_numpy(frames), float(part["fps"])))
            return {"type": "video"}
        return part


def user_message(prompt: str, images=(), video=None, fps: float = 2.0) -> list[dict]:
    """One user turn: the images (encoded bytes), then the video (frames), then the prompt."""
    content = [{"type": "image", "data": data} for data in images]
    if video is not None:
        content.append({"type": "video", "frames": video, "fps": fps})
    return [{"role": "user", "content": [*content, {"type": "text", "text": prompt}]}]
