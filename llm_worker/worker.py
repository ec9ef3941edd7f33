"""The LLM worker process: subscribes to the visual worker's embeddings, reassembles the chunks, prefills and
decodes all active requests together, and streams one tokens message a step, then a finish message for each
request that ends, to the front end."""

import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import zmq

from common.config import load_config
from common.protocol import DTYPES, Message, ProtocolError, assemble_chunks, decode, error_message
from common.tokenizer import Tokenizer
from llm_worker.engine import Engine, SamplingParams, Sequence
from llm_worker.inputs import prefill_inputs
from llm_worker.model import LanguageModel


@dataclass
class Stream:
    """One request's output as the front end sees it: text decoded as tokens come, cut at a stop string."""

    id: str
    prompt_tokens: int
    timings: dict
    stop: tuple[str, ...] = ()
    text: str = ""  # decoded so far, cut at a stop string once one appears
    sent: int = 0  # characters of text already sent
    decoded: int = 0  # tokens whose text is in `text`
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float = 0.0

    def advance(self, tokenizer: Tokenizer, tokens: list[int], done: bool) -> tuple[str, bool]:
        """Decodes the new tokens → (text that may be sent now, whether a stop string ended the text).

        Byte-level BPE: the text after a cut between whole characters does not depend on the tokens before it, so
        only the tokens since the last cut are decoded. A partial UTF-8 character waits for its next token; the last
        len(longest stop) - 1 characters wait until no stop string can start in them."""
        pending = tokenizer.decode(tokens[self.decoded:])
        if done or not pending.endswith("\ufffd"):
            self.text += pending
            self.decoded = len(tokens)
        hits = [i for s in self.stop if (i := self.text.find(s, self.sent)) >= 0]  # a match cannot start before `sent`
        if hits:
            self.text = self.text[: min(hits)]
        hold = 0 if done or hits else max(map(len, self.stop), default=1) - 1
        end = max(self.sent, len(self.text) - hold)
        delta, self.sent = self.text[self.sent : end], end
        return delta, bool(hits)


class LLMWorker:
    def __init__(self, model_dir, device, dtype, embeds: str, results: str, max_batch: int, max_len: int):
        self.config = load_config(model_dir)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.model = LanguageModel.from_pretrained(model_dir, dtype, device)
        self.engine = Engine(self.model, max_batch, max_len)
        self.pending: deque[tuple[Message, dict]] = deque()
        self.streams: dict[int, Stream] = {}  # id(Sequence) → its stream
        self.ready = False
        ctx = zmq.Context.instance()
        self.embeds = ctx.socket(zmq.SUB)
        self.embeds.connect(embeds)
        self.embeds.setsockopt(zmq.SUBSCRIBE, b"")
        self.results = ctx.socket(zmq.PUSH)
        self.results.connect(results)

    def run(self) -> None:
        parent = os.getppid()
        while os.getppid() == parent:
            idle = not (self.engine.active or self.pending)
            while self.embeds.poll(100 if idle else 0):
                self.receive(self.embeds.recv_multipart(copy=False))
                idle = False
            self.admit()
            self.publish(self.engine.step())

    def receive(self, frames) -> None:
        arrived = time.time()
        try:
            msg = decode(frames)
        except ProtocolError as e:
            return self.fail(e.request_id, e)
        if msg.type == "ping":
            if not self.ready:
                self.ready = True
                self.send(Message("ready", "llm", {"worker": "llm"}))
            return
        if msg.type == "cancel":
            return self.cancel(msg.id)
        if msg.type != "embeds":
            return self.fail(msg.id, ProtocolError(f"the LLM worker takes embeds and cancel messages, got {msg.type}"))
        self.pending.append((msg, {**msg.fields["timings"], "transport_s": arrived - msg.fields["timings"].get("sent_at", arrived)}))

    def admit(self) -> None:
        """Prefills queued requests while the engine has free rows."""
        while self.pending and len(self.engine.active) < self.engine.max_batch:
            msg, timings = self.pending.popleft()
            try:
                seq, stream = self.start(msg, timings)
            except Exception as e:  # this request fails alone
                self.fail(msg.id, e)
                continue
            self.streams[id(seq)] = stream
            self.publish([seq])  # its first token goes out at once

    def start(self, msg: Message, timings: dict) -> tuple[Sequence, Stream]:
        f = msg.fields
        dtype = DTYPES.get(f["dtype"])
        if dtype is None or not dtype.is_floating_point:
            raise ProtocolError(f"embeddings dtype {f['dtype']!r} is not a float type", msg.id)
        merge = self.config.vision.spatial_merge_size ** 2
        rows = {k: sum(t * h * w for t, h, w in f[f"{k}_grid_thw"]) // merge for k in ("image", "video")}
        if f["hidden"] != self.config.text.hidden_size:
            raise ProtocolError(f"embeddings are {f['hidden']} wide, this model's hidden size is {self.config.text.hidden_size}", msg.id)
        image, video = (assemble_chunks(msg, k, rows[k], f["hidden"], f["chunk_width"], dtype) for k in ("image", "video"))
        params = SamplingParams(**f["sampling"])
        stream = Stream(msg.id, len(f["prompt_ids"]), timings, params.stop)
        embeds, positions, delta = prefill_inputs(
            self.model, self.config, f["prompt_ids"], image, video,
            f["image_grid_thw"], f["video_grid_thw"], f["second_per_grid_ts"],
        )
        seq = self.engine.add(embeds, positions, delta, params, self.tokenizer.eos_token_ids)
        stream.first_token_at = time.perf_counter()
        stream.timings["prefill_s"] = stream.first_token_at - stream.started
        return seq, stream

    def publish(self, seqs: list[Sequence]) -> None:
        """One tokens message for the sequences' new tokens, then a finish message for each that ended."""
        entries, ended = [], []
        for seq in seqs:
            stream = self.streams[id(seq)]
            delta, stopped = stream.advance(self.tokenizer, seq.tokens, seq.finish_reason is not None)
            if stopped:
                seq.finish_reason = "stop"  # the engine frees the row before its next step
            entries.append([stream.id, [seq.tokens[-1]], delta])
            if seq.finish_reason is not None:
                del self.streams[id(seq)]
                ended.append((stream, seq.finish_reason, len(seq.tokens)))
        if entries:
            self.send(Message("tokens", "", {"requests": entries}))
        for args in ended:
            self.finish(*args)

    def cancel(self, rid: str) -> None:
        """Drops a request the front end no longer wants, queued or decoding, and acknowledges with a finish message."""
        for i, (msg, _) in enumerate(self.pending):
            if msg.id == rid:
                del self.pending[i]
                return self.finish(Stream(rid, len(msg.fields["prompt_ids"]), {}), "cancelled", 0)
        for seq in self.engine.active:
            stream = self.streams.get(id(seq))
            if stream is not None and stream.id == rid:
                seq.finish_reason = "cancelled"
                del self.streams[id(seq)]
                return self.finish(stream, "cancelled", len(seq.tokens))

    def finish(self, stream: Stream, reason: str, n: int) -> None:
        decode_s = time.perf_counter() - stream.first_token_at
        timings = {k: v for k, v in stream.timings.items() if k != "sent_at"}
        timings["decode_tokens_per_s"] = (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0
        self.send(Message("finish", stream.id, {
            "finish_reason": reason, "prompt_tokens": stream.prompt_tokens, "completion_tokens": n, "timings": timings,
        }))

    def fail(self, rid: str | None, error: Exception) -> None:
        print(f"llm worker: request {rid}: {error}", file=sys.stderr)
        if rid:
            self.send(error_message(rid, error))

    def send(self, msg: Message) -> None:
        self.results.send_multipart(msg.encode())
