"""The visual worker process: takes requests (prompt ids with one pad per media item, encoded images, video frames),
preprocesses the pixels, refuses a request whose expanded prompt would not fit the LLM's context before the ViT runs,
runs the ViT and publishes the embeddings, in hidden-dimension chunks, with the grids for the LLM worker. Requests
that arrive while the front end is silent are dropped unrun (FrontEnd)."""

import io
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch
import zmq
from PIL import Image as PILImage

from common.config import load_config, model_identity
from common.messages import Cancel, Embeds, Error, Image, Message, Ping, Ready, Request, Video
from common.options import Options, parse_patch_buckets
from common.protocol import (BROADCAST, DTYPE_NAMES, ProtocolError, decode, encode, error_message, hidden_chunks,
                             topic)
from common.runtime import FrontEnd, FrontEndGone, Heartbeats, resolve_dtype
from common.security import curve
from visual_worker.cache import EncoderCache
from visual_worker.preprocess import PreprocessConfig, load_image, preprocess_images, preprocess_video
from visual_worker.tvm_backend import TvmVisionBackend
from visual_worker.vision import VisionTransformer

PING_SECONDS = 0.2  # idle heartbeat on the embeds socket; the LLM worker reports ready once it has heard one
MAX_REQUEST_BYTES = 2**30  # a larger message on the requests socket is dropped by ZeroMQ before it is read


def open_image(data: bytes, max_pixels: int) -> PILImage.Image:
    """Decodes an encoded image, refusing one over max_pixels from its header alone (decompression bombs)."""
    try:
        with PILImage.open(io.BytesIO(data)) as header:
            width, height = header.size
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, ... on what is not an image
        raise ValueError(f"cannot decode image ({len(data)} bytes): not an image format this server reads") from None
    if width * height > max_pixels:
        raise ValueError(f"image of {width}x{height} pixels is over the {max_pixels} pixels this server opens")
    return load_image(data)


class VisualWorker:
    def __init__(self, options: Options, name: str, device: str, requests: str, embeds: str, results: str,
                 control: str):
        self.name, self.device = name, device
        self.curve = curve(options.curve_keys, "visual")
        self.heartbeats = Heartbeats(name, results, self.curve)  # from the start: a stopped load shows as silence
        self.frontend = FrontEnd(control, self.curve)
        self.dropped: dict[str, str] = {}  # request → why it was dropped, told to the front end once it is heard
        self.config = load_config(options.model)
        preprocess = PreprocessConfig.from_dir(options.model)  # --min-pixels / --max-pixels in place of its own
        self.preprocess = replace(preprocess, min_pixels=options.min_pixels or preprocess.min_pixels,
                                  max_pixels=options.max_pixels or preprocess.max_pixels)
        self.vit = VisionTransformer.from_pretrained(options.model, resolve_dtype(options.model, options.dtype), device)
        self.run_vit = self.vit.embed if options.visual_backend == "torch" else \
            TvmVisionBackend(self.vit, parse_patch_buckets(options.patch_buckets), device).embed
        self.chunk_width, self.max_image_pixels = options.chunk_width, options.max_image_pixels
        self.cache = EncoderCache(options.encoder_cache_mb * 2**20)
        self.model_id = model_identity(options.model)
        ctx = zmq.Context.instance()
        self.requests = ctx.socket(zmq.DEALER)  # the front end addresses this worker by name
        self.requests.setsockopt(zmq.IDENTITY, name.encode())
        self.requests.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        self.embeds = ctx.socket(zmq.XPUB)  # a PUB that hears subscriptions: its heartbeats name who is subscribed
        self.results = ctx.socket(zmq.PUSH)
        if self.curve is not None:
            self.curve.connect_to(self.requests, "frontend")
            self.curve.serve(self.embeds)
            self.curve.connect_to(self.results, "frontend")
        self.requests.connect(requests)
        self.embeds.bind(embeds)
        self.results.connect(results)
        self.subscribers: set[str] = set()  # the LLM workers subscribed to this worker's embeddings

    def run(self) -> None:
        parent = os.getppid()
        ready = Ready(self.model_id, self.device, embeds=self.embeds.getsockopt_string(zmq.LAST_ENDPOINT))
        self.results.send_multipart([self.name.encode(), *encode(ready)])  # waits for the front end: nothing is held
        while os.getppid() == parent:
            if self.requests.poll(PING_SECONDS * 1000):
                self.handle(self.requests.recv_multipart(copy=False))
            else:
                self.embeds.send_multipart([BROADCAST, *encode(Ping())])
            self.subscribed()
            if self.dropped and not self.frontend.gone():
                for rid, why in list(self.dropped.items()):
                    self.send(Error(rid, why, 503))
                    del self.dropped[rid]

    def subscribed(self) -> None:
        """Reads the subscriptions that reached the embeds socket (XPUB passes on the first subscription to a topic and
        its last unsubscription); its heartbeats name the LLM workers subscribed, and the front end routes a request
        through this worker only to one of them (what is published before a subscription is lost)."""
        while self.embeds.poll(0):
            event = self.embeds.recv()
            name = event[1:-1].decode(errors="replace")
            if event[-1:] == b"\0" and name.startswith("llm-"):
                (self.subscribers.add if event[:1] == b"\x01" else self.subscribers.discard)(name)
        self.heartbeats.subscribers = sorted(self.subscribers)

    def handle(self, frames) -> None:
        rid = None
        self.heartbeats.busy()
        try:
            msg = decode(frames)
            rid = getattr(msg, "id", None)
            if isinstance(msg, Cancel):  # for the LLM worker; it follows the request it names on the embeds queue
                self.embeds.send_multipart([topic(msg.llm), *encode(msg)])
            elif isinstance(msg, Request):
                if self.frontend.gone():
                    raise FrontEndGone(f"the front end sent no heartbeat for {self.frontend.silent_s():.1f} s")
                self.embeds.send_multipart([topic(msg.llm), *encode(self.embed(msg))], copy=False)
            else:
                raise ProtocolError(f"the visual worker takes request and cancel messages, got {type(msg).__name__}")
        except FrontEndGone as e:
            print(f"visual worker: dropping request {rid}: {e}", file=sys.stderr)
            if rid is not None:
                self.dropped[rid] = f"the visual worker dropped the request: {e}"
        except Exception as e:  # this request fails alone; the worker goes on
            rid = rid or getattr(e, "request_id", None)
            print(f"visual worker: request {rid}: {e}", file=sys.stderr)
            if rid is not None:
                try:
                    self.send(error_message(rid, e))
                except FrontEndGone as gone:
                    self.dropped[rid] = f"the visual worker dropped the request: {gone}"
        finally:
            self.heartbeats.idle()

    def send(self, msg: Message) -> None:
        self.frontend.send(self.results, [self.name.encode(), *encode(msg)])

    def embed(self, req: Request) -> Embeds:
        t0 = time.perf_counter()
        limits = dict(min_pixels=req.pixels.min_pixels, max_pixels=req.pixels.max_pixels)
        images = [bytes(m.data) for m in req.media if isinstance(m, Image)]
        keys = [EncoderCache.key(data, **limits) for data in images]
        cached = [self.cache.get(k) for k in keys]
        misses = [i for i, c in enumerate(cached) if c is None]
        decoded = []
        for i in misses:
            try:
                decoded.append(open_image(images[i], self.max_image_pixels))
            except ValueError as e:
                raise ValueError(f"image {i + 1}: {e}") from None
        image_pixels, miss_grid = preprocess_images(decoded, self.preprocess, **limits) if decoded else (None, [])
        miss_grid = [tuple(g) for g in np.asarray(miss_grid).reshape(-1, 3).tolist()]
        grids = iter(miss_grid)
        image_grid = [list(c[1]) if c is not None else list(next(grids)) for c in cached]
        video_pixels, video_grid, seconds = [], [], []
        for video in (m for m in req.media if isinstance(m, Video)):
            if video.frames.dtype != torch.uint8 or video.frames.ndim != 4 or video.frames.shape[-1] != 3:
                raise ValueError(f"video frames must be uint8 (T, H, W, 3), got {DTYPE_NAMES[video.frames.dtype]}"
                                 f"{list(video.frames.shape)}")
            pixels, grid, sec = preprocess_video(list(video.frames.numpy()), video.fps, self.preprocess, **limits)
            video_pixels.append(pixels)
            video_grid += np.asarray(grid).tolist()
            seconds.append(sec)
        merge = self.config.vision.spatial_merge_size ** 2
        visual = sum(t * h * w for t, h, w in image_grid + video_grid) // merge
        length = len(req.prompt_ids) - len(req.media) + visual
        if length > req.max_prompt_tokens:
            raise ValueError(f"the prompt is {length} tokens with its images and videos ({visual} visual tokens), over "
                             f"the {req.max_prompt_tokens} this model's context leaves for it: send fewer or smaller "
                             "images, or a lower max_pixels")
        t1 = time.perf_counter()
        chunks = []
        if misses:  # the ViT runs on the images the cache lacks, in one call
            computed = self.run_vit(torch.from_numpy(image_pixels), miss_grid)
            rows = [t * h * w // merge for t, h, w in miss_grid]
            for i, part, grid in zip(misses, computed.split(rows), miss_grid):
                cached[i] = (part.clone(), grid)
                self.cache.put(keys[i], *cached[i])
        if image_grid:
            chunks += hidden_chunks("image", torch.cat([c[0] for c in cached]), self.chunk_width)
        if video_grid:
            pixels = torch.from_numpy(np.concatenate(video_pixels))
            chunks += hidden_chunks("video", self.run_vit(pixels, video_grid), self.chunk_width)
        t2 = time.perf_counter()
        return Embeds(
            req.id, req.prompt_ids, [tuple(g) for g in image_grid], [tuple(g) for g in video_grid], seconds,
            req.sampling, self.config.vision.out_hidden_size, self.chunk_width,
            DTYPE_NAMES[self.vit.patch_embed.proj.weight.dtype], chunks,
            {"preprocess_s": t1 - t0, "vit_s": t2 - t1, "encoder_cache_hits": float(len(images) - len(misses)),
             "encoder_cache_queries": float(len(images)), "sent_at": time.time()},
        )
