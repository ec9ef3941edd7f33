"""The visual worker process: takes requests, builds the prompt ids, preprocesses pixels, runs the ViT and
publishes the embeddings in hidden-dimension chunks for the LLM worker."""

import os
import sys
import time

import numpy as np
import torch
import zmq

from common.config import load_config
from common.protocol import Message, ProtocolError, chunk_descriptors, decode, error_message
from common.tokenizer import Tokenizer
from visual_worker.preprocess import PreprocessConfig, load_image, preprocess_images, preprocess_video
from visual_worker.vision import VisionTransformer

PING_SECONDS = 0.2  # idle heartbeat on the embeds socket; the LLM worker reports ready once it has heard one


def _media_parts(messages: list) -> list[dict]:
    parts = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), (str, list)):
            raise ValueError("each message needs a role and a content that is a string or a list of parts")
        if isinstance(m["content"], list):
            parts += [p for p in m["content"] if isinstance(p, dict) and p.get("type") in ("image", "video")]
    return parts


class VisualWorker:
    def __init__(self, model_dir, device, dtype, requests: str, embeds: str, results: str, chunk_width: int):
        self.config = load_config(model_dir)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.preprocess = PreprocessConfig.from_dir(model_dir)
        self.vit = VisionTransformer.from_pretrained(model_dir, dtype, device)
        self.chunk_width = chunk_width
        ctx = zmq.Context.instance()
        self.requests = ctx.socket(zmq.PULL)
        self.requests.connect(requests)
        self.embeds = ctx.socket(zmq.PUB)
        self.embeds.bind(embeds)
        self.results = ctx.socket(zmq.PUSH)
        self.results.connect(results)

    def run(self) -> None:
        parent = os.getppid()
        self.results.send_multipart(Message("ready", "visual", {"worker": "visual"}).encode())
        while os.getppid() == parent:
            if self.requests.poll(PING_SECONDS * 1000):
                self.handle(self.requests.recv_multipart(copy=False))
            else:
                self.embeds.send_multipart(Message("ping", "", {}).encode())

    def handle(self, frames) -> None:
        rid = None
        try:
            msg = decode(frames)
            rid = msg.id
            if msg.type == "cancel":  # for the LLM worker; it follows the request it names on the embeds queue
                self.embeds.send_multipart(msg.encode())
            elif msg.type == "request":
                self.embeds.send_multipart(self.process(msg).encode(), copy=False)
            else:
                raise ProtocolError(f"the visual worker takes request and cancel messages, got {msg.type}", rid)
        except Exception as e:  # this request fails alone; the worker goes on
            rid = rid or getattr(e, "request_id", None)
            print(f"visual worker: request {rid}: {e}", file=sys.stderr)
            if rid is not None:
                self.results.send_multipart(error_message(rid, e).encode())

    def process(self, msg: Message) -> Message:
        f = msg.fields
        t0 = time.perf_counter()
        images = [t for d, t in msg.tensors if d.get("name") == "image"]
        videos = [t for d, t in msg.tensors if d.get("name") == "video"]
        parts = _media_parts(f["messages"])
        n_img, n_vid = sum(p["type"] == "image" for p in parts), sum(p["type"] == "video" for p in parts)
        if (n_img, n_vid) != (len(images), len(videos)):
            raise ValueError(f"messages name {n_img} images and {n_vid} videos, {len(images)} and {len(videos)} arrived")
        limits = dict(min_pixels=f.get("min_pixels"), max_pixels=f.get("max_pixels"))
        decoded = []
        for i, data in enumerate(images):
            try:
                decoded.append(load_image(data.numpy().tobytes()))
            except ValueError as e:
                raise ValueError(f"image {i + 1}: {e}") from None
        image_pixels, image_grid = preprocess_images(decoded, self.preprocess, **limits) if decoded else (None, [])
        video_pixels, video_grid, seconds = [], [], []
        fps = [p.get("fps") for p in parts if p["type"] == "video"]
        for frames, rate in zip(videos, fps):
            if not isinstance(rate, (int, float)) or rate <= 0:
                raise ValueError(f"a video needs a positive fps, got {rate!r}")
            pixels, grid, sec = preprocess_video(list(frames.numpy()), rate, self.preprocess, **limits)
            video_pixels.append(pixels)
            video_grid += np.asarray(grid).tolist()
            seconds.append(sec)
        image_grid = np.asarray(image_grid).reshape(-1, 3).tolist()
        text = self.tokenizer.apply_chat_template(f["messages"], add_generation_prompt=True)
        ids = self.tokenizer.expand_vision_pads(self.tokenizer.encode(text), image_grid, video_grid,
                                                self.config.vision.spatial_merge_size)
        t1 = time.perf_counter()
        tensors = []
        if image_grid:
            tensors += chunk_descriptors("image", self.vit.embed(torch.from_numpy(image_pixels), image_grid), self.chunk_width)
        if video_grid:
            pixels = torch.from_numpy(np.concatenate(video_pixels))
            tensors += chunk_descriptors("video", self.vit.embed(pixels, video_grid), self.chunk_width)
        t2 = time.perf_counter()
        fields = {
            "prompt_ids": ids, "image_grid_thw": image_grid, "video_grid_thw": video_grid,
            "second_per_grid_ts": seconds, "sampling": f["sampling"], "hidden": self.config.vision.out_hidden_size,
            "chunk_width": self.chunk_width, "dtype": str(self.vit.patch_embed.proj.weight.dtype).removeprefix("torch."),
            "timings": {"preprocess_s": t1 - t0, "vit_s": t2 - t1, "sent_at": time.time()},
        }
        return Message("embeds", msg.id, fields, tensors)
