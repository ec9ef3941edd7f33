"""The OpenAI-compatible HTTP server (`launch.py serve`): POST /v1/chat/completions, streamed or not, GET /v1/models,
GET /health (503 while a worker is not ready) and GET /workers, in front of the visual and LLM worker processes. Media
are fetched within a MediaPolicy, the prompt is built in a thread of its own, bodies past a limit are refused unread.
One thread reads the results socket, hands each event to the asyncio queue of the request it names, and restarts a
worker that died or stopped answering; requests and cancels are sent from the event loop only.

Extensions to OpenAI's request, as vLLM has them: `top_k`, `ignore_eos`; a video part
`{"type": "video_url", "video_url": {"url": <http(s) or data URL, or a file or frame folder under
--allowed-local-media-path>, "fps": 2.0}}`.
"""

import argparse
import asyncio
import contextlib
import json
import re
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.messages import MAX_SEED, Error, Finish, Logprob, PixelLimits, SamplingParams, TokenEntry
from common.options import Options
from frontend.api import (MAX_BODY_BYTES, APIError, ChatRequest, CompletionRequest, DetokenizeRequest, ImagePart,
                          MMProcessorKwargs, Sampling, TextPart, TokenizeRequest, ToolStream, VideoPart, grammar,
                          parse_tool_calls, unsupported_fields)
from frontend.metrics import Metrics
from frontend.media import MediaError, MediaPolicy, fetch_image, image_size, read_video
from frontend.pipeline import NoWorker, Pipeline, choose_workers
from frontend.processes import WorkerDied
from frontend.prompt import Prompter
from visual_worker.preprocess import PreprocessConfig

DEFAULT_MAX_TOKENS = 1024  # max_tokens when a request sets none (--default-max-tokens); the context end bounds it too
MAX_REQUEST_PIXELS = 2**27  # all images and video frames of one request, decoded: about 400 MB of RGB
DEFAULT_FPS = 2.0  # video frames sampled a second when neither the part nor mm_processor_kwargs say
LIMIT_MM = {"image": 16, "video": 4}  # media items of one request, by kind (--limit-mm-per-prompt)


def parse_limit_mm(text: str) -> dict[str, int]:
    """vLLM's --limit-mm-per-prompt, JSON ('{"image": 4}') or image=4,video=1 → LIMIT_MM with those counts."""
    try:
        given = json.loads(text) if text.lstrip().startswith("{") else \
            {k.strip(): int(v) for k, v in (item.split("=") for item in text.split(",") if item.strip())}
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes '{{\"image\": N, \"video\": M}}' or image=N,video=M, got {text!r}")
    if not isinstance(given, dict) or set(given) - set(LIMIT_MM) or \
            not all(isinstance(v, int) and v >= 0 for v in given.values()):
        raise argparse.ArgumentTypeError(f"takes counts >= 0 of image and video, got {text!r}")
    return {**LIMIT_MM, **given}


def sampling_defaults(model_dir) -> dict:
    """The sampling settings of the checkpoint's generation_config.json that a request may leave unset, as vLLM
    applies them; do_sample false (greedy in transformers' generate) is temperature 0."""
    path = Path(model_dir) / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    out = {k: config[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty") if k in config}
    if config.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


class Router:
    """Reads every result in a thread of its own and puts it on its request's asyncio queue. It also supervises:
    when a worker dies or stops answering, the requests it held get a 503 naming it, the worker is restarted with
    backoff, and new requests are refused with 503 until it is ready again. Nothing a message holds stops it."""

    def __init__(self, pipeline: Pipeline, loop: asyncio.AbstractEventLoop):
        self.pipeline, self.loop = pipeline, loop
        self.queues: dict[str, asyncio.Queue] = {}
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self.run, name="results-router", daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.closing.is_set():
            try:
                self.pipeline.restart_due()
                batch = self.pipeline.receive(timeout_s=0.2)
            except WorkerDied as e:
                self.worker_died(e)
                continue
            except Exception as e:  # a bug, not input: logged, and the router goes on
                print(f"server: the results router hit {e!r}; going on", file=sys.stderr)
                time.sleep(0.2)
                continue
            if batch:  # a decode step's tokens for every request in one hand-over to the event loop
                self.loop.call_soon_threadsafe(self.deliver, batch)

    def worker_died(self, e: WorkerDied) -> None:
        wait = self.pipeline.restart(e)
        then = "it is not restarted here (it joined by itself)" if wait is None else f"restarting it in {wait:.0f} s"
        print(f"server: {e}; {then}", file=sys.stderr)
        error = WorkerDied(e.worker, f"{e}; the request was lost with it ({then.split(' in ')[0]})")
        lost = self.pipeline.lost(e.worker)  # the requests routed to it (a visual worker's: those with no token yet)
        self.loop.call_soon_threadsafe(self.deliver, [(rid, error) for rid in lost])

    def deliver(self, batch: list) -> None:
        """Puts (request id, event) on the queue of the request each result or lost-worker error names."""
        for item in batch:
            rid, event = (item if isinstance(item, tuple) else (item.id, item))
            if (q := self.queues.get(rid)) is not None:
                q.put_nowait((rid, event))

    def check(self) -> None:
        """Raises APIError 503 when the router has stopped or no ready visual and LLM worker are joined."""
        if not self.thread.is_alive():
            raise APIError(503, "the server's results router has stopped")
        health = list(self.pipeline.health.items())
        for role in ("visual", "llm"):
            if not self.pipeline.ready(role):
                states = "; ".join(f"{n} is {h.state}" + (f" ({h.reason})" if h.reason else "")
                                   for n, h in health if h.role == role)
                raise APIError(503, f"no {role} worker is ready: {states}", code="worker_unavailable")
        try:
            choose_workers(dict(health), ())
        except NoWorker as e:  # ready, but no LLM worker subscribed to a visual worker yet (a moment after a start)
            raise APIError(503, str(e), code="worker_unavailable") from None

    def open(self, rids: list[str]) -> asyncio.Queue:
        """One queue for the events of all the requests of one HTTP request (its n choices)."""
        self.check()
        q = asyncio.Queue()
        with self.lock:
            self.queues.update(dict.fromkeys(rids, q))
        return q

    def close(self, rids: list[str]) -> None:
        with self.lock:
            for rid in rids:
                self.queues.pop(rid, None)

    def stop(self) -> None:
        self.closing.set()
        self.thread.join()


@dataclass
class Choice:
    """One of a request's n answers as its events arrive."""

    text: list[str] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish: Finish | None = None


class Server:
    def __init__(self, pipeline: Pipeline, model_name: str, media: MediaPolicy, default_max_tokens: int,
                 limit_mm: dict[str, int], max_request_pixels: int, defaults: dict):
        self.pipeline, self.model_name, self.media = pipeline, model_name, media
        self.default_max_tokens, self.limit_mm = default_max_tokens, limit_mm
        self.max_request_pixels = max_request_pixels  # decoded pixels of all its media: what the visual worker holds
        self.defaults = defaults  # sampling defaults (generation_config.json's), for fields a request leaves unset
        self.prompter = Prompter(pipeline.options.model, pipeline.context_len)
        self.text_work = ThreadPoolExecutor(1, thread_name_prefix="prompt")  # one tokenizer, one thread
        self.created = int(time.time())
        self.metrics = Metrics(model_name)
        self.router: Router | None = None

    def sampling(self, req: Sampling, max_new_tokens: int | None, logprobs: int | None = None,
                 grammar_source: str | None = None) -> SamplingParams:
        """The request's sampling settings, checked by SamplingParams as the LLM worker will check them; what it
        leaves unset comes from the checkpoint's generation_config.json, then OpenAI's defaults."""
        def pick(name: str, fallback):
            value = getattr(req, name)
            return self.defaults.get(name, fallback) if value is None else value

        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        try:
            return SamplingParams(
                max_new_tokens=max_new_tokens or self.default_max_tokens,
                temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0), top_k=pick("top_k", 0),
                seed=req.seed, ignore_eos=req.ignore_eos, stop=tuple(stop),
                frequency_penalty=req.frequency_penalty or 0.0, presence_penalty=req.presence_penalty or 0.0,
                repetition_penalty=pick("repetition_penalty", 1.0),
                logit_bias=req.logit_bias_ids(self.prompter.tokenizer.vocab_size), logprobs=logprobs,
                grammar=grammar_source)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def chat_sampling(self, req: ChatRequest) -> SamplingParams:
        return self.sampling(req, req.max_completion_tokens or req.max_tokens,
                             (req.top_logprobs or 0) if req.logprobs else None, grammar(req))

    async def media_part(self, part: ImagePart | VideoPart, index: int, fps: float) -> tuple[dict, int]:
        """An image or video part → the prompt builder's part holding its bytes or frames, and its decoded pixels."""
        if isinstance(part, ImagePart):
            url = part.url
            if not url.startswith(("http://", "https://", "data:image/")) and self.media.allowed_local_media_path is None:
                raise APIError(400, f"image {index}: image_url must be an http(s) URL or a data:image/...;base64, URI, "
                                    f"got {url[:40]!r}", "messages")
            try:
                data = await fetch_image(url, self.media)
                width, height = image_size(data, self.media)
            except MediaError as e:
                raise APIError(400, f"image {index}: cannot decode or fetch it: {e}", "messages") from None
            return {"type": "image", "data": data}, width * height
        video = part.video_url
        fps = video.fps or fps
        try:
            frames = await read_video(video.url, fps, self.media)
        except MediaError as e:
            raise APIError(400, f"video {index}: cannot read it: {e}", "messages") from None
        return {"type": "video", "frames": frames, "fps": fps}, frames.size // 3

    async def to_request(self, req: ChatRequest, rid: str):
        """OpenAI messages → a Request: media fetched (all of a request's at once), then the prompt built in the
        tokenizer's thread."""
        parts = [p for m in req.messages if isinstance(m.content, list) for p in m.content if not isinstance(p, TextPart)]
        count = {ImagePart: 0, VideoPart: 0}
        for p in parts:
            count[type(p)] += 1
        for kind, n in (("image", count[ImagePart]), ("video", count[VideoPart])):
            if n > self.limit_mm[kind]:
                raise APIError(400, f"{n} {kind}s in one request; at most {self.limit_mm[kind]} are allowed "
                                    f"(--limit-mm-per-prompt)", "messages")
        kwargs = req.mm_processor_kwargs or MMProcessorKwargs()
        try:
            pixels = PixelLimits(kwargs.min_pixels, kwargs.max_pixels)
        except ValueError as e:
            raise APIError(400, f"mm_processor_kwargs: {e}", "mm_processor_kwargs") from None
        if None not in (kwargs.min_pixels, kwargs.max_pixels) and kwargs.min_pixels > kwargs.max_pixels:
            raise APIError(400, f"mm_processor_kwargs: min_pixels {kwargs.min_pixels} is above max_pixels "
                                f"{kwargs.max_pixels}", "mm_processor_kwargs")
        numbered, seen = [], {ImagePart: 0, VideoPart: 0}
        for p in parts:
            seen[type(p)] += 1
            numbered.append(self.media_part(p, seen[type(p)], kwargs.fps or DEFAULT_FPS))
        fetched = await asyncio.gather(*numbered)
        decoded = sum(n for _, n in fetched)
        if decoded > self.max_request_pixels:
            raise APIError(400, f"the request's images and videos hold {decoded} pixels; at most "
                                f"{self.max_request_pixels} are allowed in one request (--max-request-pixels)", "messages")
        fetched = iter(part for part, _ in fetched)
        messages = [m.template_dict(m.content if not isinstance(m.content, list) else
                                    [{"type": "text", "text": p.text} if isinstance(p, TextPart) else next(fetched)
                                     for p in m.content]) for m in req.messages]
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools_on else None

        def build():
            return self.prompter.request(messages, self.chat_sampling(req), pixels, rid, tools)

        try:
            return await asyncio.get_running_loop().run_in_executor(self.text_work, build)
        except UnicodeEncodeError:
            raise APIError(400, "the messages hold text that is not valid Unicode (a lone surrogate?)",
                           "messages") from None
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None

    def send(self, request) -> None:
        try:
            self.pipeline.submit(request)
        except NoWorker as e:
            raise APIError(503, str(e), code="worker_unavailable") from None

    async def results(self, rids: list[str], queue: asyncio.Queue):
        """(choice index, event) for the requests' token events, then each one's finish event; an error raises
        APIError with the worker's code. Leaving early (client gone, worker lost) cancels the requests still open in
        the workers. Every event is counted in /metrics."""
        index = {rid: i for i, rid in enumerate(rids)}
        pending = set(rids)
        timing = self.metrics.start(rids)
        try:
            while pending:
                rid, event = await queue.get()
                if isinstance(event, WorkerDied):
                    raise APIError(503, str(event), code="worker_died")
                timing.event(rid, event)
                if isinstance(event, Error):
                    pending.discard(rid)
                    raise APIError(event.code, event.message)
                if isinstance(event, Finish):
                    pending.discard(rid)
                yield index[rid], event
        finally:
            timing.close()
            self.router.close(rids)
            for rid in pending:
                self.pipeline.cancel(rid)

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(400, f"model {model!r} is not served here; this server serves {self.model_name!r}",
                           "model", "model_not_found")

    def logprob_entry(self, token_id: int, logprob: Logprob) -> dict:
        """OpenAI's logprobs.content item: the token's text and bytes, its log-probability, the top ones."""
        def entry(t: int, value: float) -> dict:
            data = self.prompter.tokenizer.token_bytes(t)
            return {"token": data.decode("utf-8", "replace"), "logprob": value, "bytes": list(data)}
        return {**entry(token_id, logprob.logprob), "top_logprobs": [entry(t, v) for t, v in logprob.top]}

    def logprobs_of(self, event: TokenEntry) -> list[dict]:
        return [self.logprob_entry(t, lp) for t, lp in zip(event.token_ids, event.logprobs)]

    async def launch(self, req: Sampling, first_request):
        """Sends the request's n choices (copies of first_request, a common.messages.Request; with a seed, choice i
        samples with seed + i, so the choices differ and each is reproducible) → (their events, the first one), errors
        before the first token raised with their HTTP status."""
        rid = first_request.id
        requests = [first_request] + [msgspec.structs.replace(
            first_request, id=f"{rid}-{i}", sampling=msgspec.structs.replace(
                first_request.sampling, seed=None if req.seed is None else (req.seed + i) % (MAX_SEED + 1)))
            for i in range(1, req.n)]
        rids = [r.id for r in requests]
        results = self.results(rids, self.router.open(rids))
        try:
            for request in requests:
                self.send(request)
            return results, await anext(results)
        except BaseException:
            await results.aclose()
            raise

    async def chat(self, req: ChatRequest):
        unsupported_fields(req)
        self.check_model(req.model)
        rid = uuid.uuid4().hex
        self.router.check()
        results, first = await self.launch(req, await self.to_request(req, rid))
        head = {"id": f"chatcmpl-{rid}", "created": int(time.time()), "model": self.model_name}
        if req.stream:
            return StreamingResponse(self.stream(head, req, first, results), media_type="text/event-stream")
        requests = range(req.n)
        choices = [Choice() for _ in requests]
        try:
            async for i, event in _chain(first, results):
                if isinstance(event, TokenEntry):
                    choices[i].text.append(event.text)
                    choices[i].logprobs += self.logprobs_of(event)
                else:
                    choices[i].finish = event
        finally:
            await results.aclose()
        out = []
        for i, c in enumerate(choices):
            text, reason = "".join(c.text), c.finish.finish_reason
            message = {"role": "assistant", "content": text}
            if req.tools_on:
                message["content"], calls = parse_tool_calls(text, req.parallel_tool_calls)
                if calls:
                    message["tool_calls"], reason = calls, "tool_calls"
            out.append({"index": i, "message": message, "finish_reason": reason,
                        "logprobs": {"content": c.logprobs} if req.logprobs else None})
        return {**head, "object": "chat.completion", "choices": out,
                "usage": usage_of([c.finish for c in choices])}

    async def completions(self, req: CompletionRequest):
        """/v1/completions: the prompt continued as it is. Its answers, and their logprobs in the legacy shape
        (tokens, token_logprobs, top_logprobs, text_offset), streamed or not."""
        unsupported_fields(req)
        self.check_model(req.model)
        rid = uuid.uuid4().hex
        self.router.check()
        tokenizer = self.prompter.tokenizer

        def build():
            ids = tokenizer.encode(req.prompt) if isinstance(req.prompt, str) else list(req.prompt)
            return self.prompter.tokens_request(ids, self.sampling(req, req.max_tokens, req.logprobs), rid)

        try:
            request = await asyncio.get_running_loop().run_in_executor(self.text_work, build)
        except UnicodeEncodeError:
            raise APIError(400, "the prompt is not valid Unicode (a lone surrogate?)", "prompt") from None
        except ValueError as e:
            raise APIError(400, str(e), "prompt") from None
        echo = (req.prompt if isinstance(req.prompt, str) else tokenizer.decode(req.prompt)) if req.echo else ""
        results, first = await self.launch(req, request)
        head = {"id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()), "model": self.model_name}
        offsets = [len(echo)] * req.n

        def logprobs_of(i: int, event: TokenEntry) -> dict:
            entries = self.logprobs_of(event)
            out = {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                   "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
                   "text_offset": [offsets[i]] * len(entries)}
            offsets[i] += len(event.text)
            return out

        if req.stream:
            async def stream():
                include_usage = req.stream_options is not None and req.stream_options.include_usage
                extra, finishes = ({"usage": None} if include_usage else {}), []

                def chunk(i, text, reason=None, logprobs=None) -> str:
                    choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}
                    return f"data: {json.dumps({**head, **extra, 'choices': [choice]})}\n\n"

                try:
                    for i in range(req.n if echo else 0):
                        yield chunk(i, echo)
                    async for i, item in _chain(first, results):
                        if isinstance(item, TokenEntry):
                            yield chunk(i, item.text, logprobs=logprobs_of(i, item) if req.logprobs is not None
                                        else None)
                        else:
                            finishes.append(item)
                            yield chunk(i, "", item.finish_reason)
                    if include_usage:
                        yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage_of(finishes)})}\n\n"
                except APIError as e:
                    yield f"data: {json.dumps(e.body())}\n\n"
                finally:
                    await results.aclose()
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")
        texts, logprobs, finishes = [[] for _ in range(req.n)], [[] for _ in range(req.n)], [None] * req.n
        try:
            async for i, event in _chain(first, results):
                if isinstance(event, TokenEntry):
                    logprobs[i].append(logprobs_of(i, event))
                    texts[i].append(event.text)
                else:
                    finishes[i] = event
        finally:
            await results.aclose()

        def merged(parts: list[dict]) -> dict:
            return {k: [x for part in parts for x in part[k]] for k in ("tokens", "token_logprobs", "top_logprobs",
                                                                         "text_offset")}

        return {**head, "choices": [{"index": i, "text": echo + "".join(texts[i]),
                                     "finish_reason": finishes[i].finish_reason,
                                     "logprobs": merged(logprobs[i]) if req.logprobs is not None else None}
                                    for i in range(req.n)], "usage": usage_of(finishes)}

    async def stream(self, head: dict, req: ChatRequest, first, results):
        """Server-sent events in the shape of OpenAI's chat.completion.chunk, one for every generated token (its text
        may be empty: a partial character, text held back for a stop string or a tool call), as vLLM does, so
        inter-token latency is measured per token; then the usage chunk if asked, then `data: [DONE]`. With tools,
        each <tool_call> block goes out whole, as one tool_calls delta, once it closes."""
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        extra = {"usage": None} if include_usage else {}  # OpenAI: usage is null on all but the last chunk
        tool_streams = [ToolStream(req.parallel_tool_calls) for _ in range(req.n)] if req.tools_on else None
        calls_sent = [0] * req.n
        finishes = []

        def event(body: dict) -> str:
            return f"data: {json.dumps(body)}\n\n"

        def chunk(i: int, delta: dict, finish_reason=None, logprobs=None) -> str:
            choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            return event({**head, "object": "chat.completion.chunk", **extra, "choices": [choice]})

        def delta_of(i: int, text: str, done: bool = False) -> dict:
            if tool_streams is None:
                return {"content": text}
            content, calls = tool_streams[i].feed(text, done)
            delta = {"content": content}
            if calls:
                delta["tool_calls"] = [{"index": calls_sent[i] + k, **c} for k, c in enumerate(calls)]
                calls_sent[i] += len(calls)
            return delta

        try:
            for i in range(req.n):
                yield chunk(i, {"role": "assistant", "content": ""})
            async for i, item in _chain(first, results):
                if isinstance(item, TokenEntry):
                    yield chunk(i, delta_of(i, item.text), logprobs={"content": self.logprobs_of(item)}
                                if req.logprobs else None)
                elif isinstance(item, Finish):
                    finishes.append(item)
                    if tool_streams is not None and (rest := delta_of(i, "", done=True)) != {"content": ""}:
                        yield chunk(i, rest)
                    reason = "tool_calls" if calls_sent[i] else item.finish_reason
                    yield chunk(i, {}, reason)
            if include_usage:
                yield event({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage_of(finishes)})
        except APIError as e:  # after the first token: the status line has gone out already
            yield event(e.body())
        finally:
            await results.aclose()
        yield "data: [DONE]\n\n"


async def _chain(first, rest):
    yield first
    async for item in rest:
        yield item


async def until_gone(work, request: Request):
    """The answer, or a 499 when the client goes away first (its requests are then cancelled in the workers); once a
    stream has begun, StreamingResponse watches for that itself."""
    answer = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(client_gone(request))
    await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if answer.done():
        return answer.result()
    answer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await answer
    return Response(status_code=499)  # "client closed request"; no one is there to read it


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects (the request's body has been read: the next ASGI message is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def usage_of(finishes: list[Finish]) -> dict:
    """OpenAI's usage of a request's choices: the prompt once, every choice's completion."""
    p, c = finishes[0].prompt_tokens, sum(f.completion_tokens for f in finishes)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class BodyLimit:
    """ASGI middleware: reads a request's body first, and answers 413 unread past max_bytes (declared or streamed);
    the app then gets the body as one message, and the connection's later messages (a disconnect) as they come."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self.refuse(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body was whole
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self.refuse(scope, receive, send)
            if not message.get("more_body", False):
                break
        whole = [{"type": "http.request", "body": bytes(body), "more_body": False}]

        async def replay():
            return whole.pop() if whole else await receive()

        await self.app(scope, replay, send)

    async def refuse(self, scope, receive, send):
        error = APIError(413, f"the request body is larger than the {self.max_bytes / 2**20:g} MiB allowed")
        await error.response()(scope, receive, send)


def create_app(pipeline: Pipeline, model_name: str, media: MediaPolicy = MediaPolicy(),
               default_max_tokens: int = DEFAULT_MAX_TOKENS, limit_mm: dict[str, int] = LIMIT_MM,
               max_request_pixels: int = MAX_REQUEST_PIXELS, max_body_bytes: int = MAX_BODY_BYTES,
               generation_config: str = "auto") -> FastAPI:
    """The app over a Pipeline whose workers are ready."""
    server = Server(pipeline, model_name, media, default_max_tokens, limit_mm, max_request_pixels,
                    sampling_defaults(pipeline.options.model) if generation_config == "auto" else {})

    async def lifespan(app):
        server.router = Router(pipeline, asyncio.get_running_loop())
        yield
        server.router.stop()

    app = FastAPI(title="Qwen2.5-VL disaggregated", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return APIError(e.status_code, message.get(e.status_code, str(e.detail))).response()

    @app.exception_handler(Exception)
    async def internal(request, e: Exception):  # a bug: logged, answered without its internals
        print(f"server: {request.url.path}: {e!r}", file=sys.stderr)
        return APIError(500, "internal server error").response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        errors = e.errors()
        if errors[0]["type"] == "json_invalid":
            return APIError(400, "the request body is not valid JSON").response()

        def field_path(loc) -> str:  # without "body" and the union branches pydantic tried (str, list[...], TextPart)
            return ".".join(str(x) for x in loc if x != "body" and not (isinstance(x, str) and re.match(
                r"^([A-Z]|str$|int$|float$|bool$|list\[|dict\[|function-|json-or-python|literal\[|tagged-union)", x)))

        where = field_path(errors[0]["loc"])
        same = [err for err in errors if field_path(err["loc"]) == where]  # one field's failed union branches
        reasons = " or ".join(dict.fromkeys(err["msg"] for err in same))
        more = f" (and {len(errors) - len(same)} more)" if len(errors) > len(same) else ""
        return APIError(400, f"{where}: {reasons}{more}", where or None).response()

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        server.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give either prompt or messages", "prompt")
        if req.messages is not None and any(isinstance(m.content, list) and any(not isinstance(p, TextPart)
                                                                                 for p in m.content)
                                            for m in req.messages):
            raise APIError(400, "/tokenize takes text only: an image or video counts as its own tokens once seen",
                           "messages")
        tokenizer = server.prompter.tokenizer
        if req.prompt is not None:
            work = lambda: tokenizer.encode(req.prompt)  # noqa: E731
        else:
            messages = [m.template_dict(m.content if not isinstance(m.content, list) else
                                        [{"type": "text", "text": p.text} for p in m.content]) for m in req.messages]
            work = lambda: tokenizer.encode_chat(messages, req.add_generation_prompt)  # noqa: E731
        try:
            ids = await asyncio.get_running_loop().run_in_executor(server.text_work, work)
        except UnicodeEncodeError:
            raise APIError(400, "the text is not valid Unicode (a lone surrogate?)", "prompt") from None
        return {"count": len(ids), "max_model_len": server.prompter.context_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        server.check_model(req.model)
        tokenizer = server.prompter.tokenizer
        if req.tokens and max(req.tokens) >= tokenizer.vocab_size:
            raise APIError(400, f"token {max(req.tokens)} is past this model's vocabulary of {tokenizer.vocab_size}",
                           "tokens")
        text = await asyncio.get_running_loop().run_in_executor(server.text_work,
                                                                lambda: tokenizer.decode(req.tokens, False))
        return {"prompt": text}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        return await until_gone(server.chat(req), request)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await until_gone(server.completions(req), request)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": server.created,
                                            "owned_by": "qwen-vl-disagg"}]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            raise APIError(404, f"model {model_id!r} is not served here; this server serves {model_name!r}", "model",
                           "model_not_found")
        return {"id": model_name, "object": "model", "created": server.created, "owned_by": "qwen-vl-disagg"}

    image = PreprocessConfig.from_dir(pipeline.options.model)
    limits = {"min_pixels": pipeline.options.min_pixels or image.min_pixels,  # the visual worker's: --min/--max-pixels,
              "max_pixels": pipeline.options.max_pixels or image.max_pixels}  # else the checkpoint's
    page_server = json.dumps({"model": model_name, "factor": image.patch_size * image.merge_size, **limits})
    page = (Path(__file__).parent / "static" / "chat.html").read_text().replace("{{server}}",
                                                                                page_server.replace("<", "\\u003c"))

    @app.get("/")
    async def chat_page():
        """The web chat page (frontend/static/chat.html), given the model's name and image resize rule."""
        return HTMLResponse(page)

    @app.get("/metrics")
    async def metrics():
        """Prometheus' text format, vLLM's metric names (frontend/metrics.py)."""
        return Response(server.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/health")
    async def health():
        server.router.check()
        return {"status": "ok"}

    @app.get("/workers")
    async def workers():
        """Each worker's state as the front end sees it."""
        now = time.monotonic()
        started = pipeline.workers.workers
        return {name: {"role": h.role, "state": h.state, "device": h.device, "pid": h.pid,
                       "busy_s": round(h.busy_s, 3), "served": h.served, "subscribers": list(h.subscribers),
                       "heartbeat_age_s": round(now - h.last_heartbeat, 3) if h.last_heartbeat else None,
                       "reason": h.reason, "started_here": h.started_here,
                       "restarts": started[name].restarts if name in started else 0,
                       "last_failures": started[name].log if name in started else []}
                for name, h in list(pipeline.health.items())}

    return app


def serve_options(p) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this host only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="model id clients must name (default: the model directory's name)")
    p.add_argument("--default-max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="max_tokens of a request that sets none")
    p.add_argument("--limit-mm-per-prompt", type=parse_limit_mm, default=LIMIT_MM,
                   help='images and videos in one request, as vLLM takes it: \'{"image": 16, "video": 4}\' or '
                        'image=16,video=4 (a kind left out keeps its default)')
    p.add_argument("--generation-config", choices=["auto", "openai"], default="auto",
                   help="sampling defaults of a request that sets none: auto, the checkpoint's generation_config.json "
                        "(do_sample false: greedy, as transformers' generate); openai: temperature 1, top_p 1")
    p.add_argument("--max-request-pixels", type=int, default=MAX_REQUEST_PIXELS,
                   help="decoded pixels of all images and video frames of one request")
    p.add_argument("--max-body-mb", type=float, default=MAX_BODY_BYTES / 2**20, help="largest request body")
    p.add_argument("--allowed-local-media-path", type=Path,
                   help="image and video URLs may name files under this folder (default: no local files)")
    p.add_argument("--allowed-media-domains", default="",
                   help="comma-separated hosts media URLs may name (default: any public host)")
    p.add_argument("--allow-private-urls", action="store_true",
                   help="let media URLs reach loopback, private and link-local addresses")
    p.add_argument("--media-timeout-s", type=float, default=MediaPolicy.fetch_timeout_s,
                   help="deadline for fetching and decoding one image or video")


def serve(args) -> int:
    options = Options.from_args(args)
    options.check()
    media = MediaPolicy(allowed_local_media_path=args.allowed_local_media_path,
                        allowed_media_domains=tuple(d for d in args.allowed_media_domains.split(",") if d),
                        allow_private_urls=args.allow_private_urls, fetch_timeout_s=args.media_timeout_s)
    pipeline = Pipeline(options)
    try:
        pipeline.start()
        if started := tuple(r for r in ("visual", "llm") if getattr(options, f"{r}_workers")):
            pipeline.wait_ready(started)
        if len(started) < 2:
            e = pipeline.endpoints
            print(f"workers started by hand join with --requests {e.requests} --results {e.results} --control "
                  f"{e.control}", file=sys.stderr)
        name = args.served_model_name or Path(options.model).resolve().name
        app = create_app(pipeline, name, media, args.default_max_tokens, args.limit_mm_per_prompt,
                         args.max_request_pixels, int(args.max_body_mb * 2**20), args.generation_config)
        print(f"serving {name!r} on http://{args.host}:{args.port}/v1 (chat page: http://{args.host}:{args.port}/)",
              file=sys.stderr)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
        return 0
    finally:
        pipeline.close()
