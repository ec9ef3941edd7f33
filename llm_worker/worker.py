"""The LLM worker process: subscribes to the visual worker's embeddings, reassembles the chunks, expands each media
item's pad, prefills and decodes all active requests together, and streams one Tokens message a step, then a Finish
message for each request that ends, to the front end. No input stops it: a bad message fails its own request, a
failed step fails the requests in it. A front end that falls silent has its requests dropped (FrontEnd)."""

import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import zmq

from common.config import load_config, model_identity
from common.messages import Cancel, Embeds, Error, Finish, Message, Ping, Ready, TokenEntry, Tokens
from common.options import Options
from common.protocol import BROADCAST, ProtocolError, assemble_chunks, decode, encode, error_message, topic
from common.runtime import FrontEnd, FrontEndGone, Heartbeats, resolve_dtype
from common.security import curve
from common.tokenizer import Tokenizer
from llm_worker import parallel
from llm_worker.engine import Engine, Sequence
from llm_worker.grammar import Grammars
from llm_worker.inputs import expand_vision_pads, prefill_inputs
from llm_worker.model import LanguageModel

MAX_EMBEDS_BYTES = 2**31  # a larger message on the embeds socket is dropped by ZeroMQ before it is read


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
    def __init__(self, options: Options, name: str, device: str, results: str, control: str):
        self.name, self.device = name, device
        self.curve = curve(options.curve_keys, "llm")
        self.heartbeats = Heartbeats(name, results, self.curve)  # from the start: a stopped load shows as silence
        self.frontend = FrontEnd(control, self.curve)
        self.config = load_config(options.model)
        self.tokenizer = Tokenizer.from_dir(options.model)
        if options.tp > 1:  # rank 0 of a tensor-parallel group: it starts the other ranks
            self.model = parallel.launch(options, device)
        else:
            self.model = LanguageModel.from_pretrained(options.model, resolve_dtype(options.model, options.dtype),
                                                       device, options.quantization)
        self.engine = Engine(self.model, options.max_batch, options.max_model_len, options.prefill_chunk)
        self.grammars = Grammars((options.model / "tokenizer.json").read_text(), self.config.text.vocab_size,
                                 self.tokenizer.eos_token_ids)
        self.pending: deque[tuple[Embeds, dict]] = deque()
        self.streams: dict[int, Stream] = {}  # id(Sequence) → its stream
        self.open: set[str] = set()  # requests received whose Finish or Error has not been sent
        self.dropped: dict[str, str] = {}  # request → why it was dropped, told to the front end once it is heard
        self.ready = False
        ctx = zmq.Context.instance()
        self.embeds = ctx.socket(zmq.SUB)
        self.embeds.setsockopt(zmq.MAXMSGSIZE, MAX_EMBEDS_BYTES)
        self.results = ctx.socket(zmq.PUSH)
        if self.curve is not None:
            self.curve.connect_to(self.embeds, "visual")
            self.curve.connect_to(self.results, "frontend")
        self.embeds.setsockopt(zmq.SUBSCRIBE, topic(name))
        self.embeds.setsockopt(zmq.SUBSCRIBE, BROADCAST)
        self.visual: set[str] = set()  # the visual workers' endpoints it has connected to
        self.results.connect(results)
        self.model_id = model_identity(options.model)

    def run(self) -> None:
        parent = os.getppid()
        while os.getppid() == parent:
            idle = not (self.engine.active or self.engine.prefilling or self.pending)
            for endpoint in set(self.frontend.embeds) - self.visual:  # ZeroMQ reconnects to them by itself
                self.embeds.connect(endpoint)
                self.visual.add(endpoint)
            while self.embeds.poll(100 if idle else 0):
                self.receive(self.embeds.recv_multipart(copy=False)[1:])  # after its topic frame
                idle = False
            self.heartbeats.busy()
            try:
                self.watch()
                self.admit()
                self.step()
            except FrontEndGone as e:
                self.drop(f"the llm worker dropped the request: {e}")
            self.heartbeats.idle()

    def watch(self) -> None:
        """Raises FrontEndGone while requests are held for a silent front end; once it is heard, tells it what was
        dropped."""
        if self.frontend.gone():
            if self.open or self.pending:
                raise FrontEndGone(f"the front end sent no heartbeat for {self.frontend.silent_s():.1f} s")
        elif self.dropped:
            for rid, why in list(self.dropped.items()):
                self.send(Error(rid, why, 503))
                del self.dropped[rid]

    def drop(self, why: str) -> None:
        print(f"llm worker: dropping {len(self.open)} requests: {why}", file=sys.stderr)
        self.dropped.update(dict.fromkeys(self.open, why))
        self.open.clear()
        self.pending.clear()
        self.streams.clear()
        self.engine.abort_all(FrontEndGone(why))

    def receive(self, frames) -> None:
        arrived = time.time()
        try:
            msg = decode(frames)
        except ProtocolError as e:
            return self.fail(e.request_id, e)
        if isinstance(msg, Ping):
            if not self.ready:
                self.ready = True
                ready = Ready(self.model_id, self.device, self.engine.max_batch, self.engine.max_len)
                self.results.send_multipart([self.name.encode(), *encode(ready)])  # nothing is held yet
        elif isinstance(msg, Cancel):
            self.cancel(msg.id)
        elif isinstance(msg, Embeds):
            self.open.add(msg.id)
            self.pending.append((msg, {**msg.timings, "transport_s": arrived - msg.timings.get("sent_at", arrived),
                                       "arrived_at": time.perf_counter()}))
        else:
            self.fail(getattr(msg, "id", None),
                      ProtocolError(f"the LLM worker takes embeds and cancel messages, got {type(msg).__name__}"))

    def admit(self) -> None:
        """Takes queued requests while the engine has free rows (and no long prompt is being prefilled)."""
        while self.pending and self.engine.can_add():
            msg, timings = self.pending.popleft()
            try:
                seq, stream = self.start(msg, timings)
            except Exception as e:  # this request fails alone
                self.fail(msg.id, e)
                continue
            self.streams[id(seq)] = stream
            if seq.tokens:  # prefilled at once: its first token goes out now
                self.publish([seq])

    def step(self) -> None:
        """One decode step of every active request; a step that fails as a whole fails the requests in it, and the
        worker goes on with the next."""
        try:
            seqs = self.engine.step()
        except Exception as e:
            print(f"llm worker: a decode step failed: {e!r}", file=sys.stderr)
            seqs = self.engine.abort_all(RuntimeError(f"the decode step failed: {type(e).__name__}"))
        self.publish(seqs)

    def start(self, msg: Embeds, timings: dict) -> tuple[Sequence, Stream]:
        config = self.config
        if msg.hidden != config.text.hidden_size:
            raise ProtocolError(f"embeddings are {msg.hidden} wide, this model's hidden size is "
                                f"{config.text.hidden_size}", msg.id)
        ids = expand_vision_pads(msg.prompt_ids, msg.image_grid_thw, msg.video_grid_thw, config.image_token_id,
                                 config.video_token_id, config.vision.spatial_merge_size)
        if len(msg.second_per_grid_ts) != len(msg.video_grid_thw):
            raise ProtocolError(f"{len(msg.video_grid_thw)} video grids but {len(msg.second_per_grid_ts)} "
                                "second_per_grid_ts", msg.id)
        merge = config.vision.spatial_merge_size ** 2
        rows = {"image": sum(t * h * w for t, h, w in msg.image_grid_thw) // merge,
                "video": sum(t * h * w for t, h, w in msg.video_grid_thw) // merge}
        image, video = (assemble_chunks(msg, kind, rows[kind]) for kind in ("image", "video"))
        stream = Stream(msg.id, len(ids), timings, msg.sampling.stop)
        timings["queue_s"] = stream.started - timings.pop("arrived_at", stream.started)  # waiting for a batch row
        embeds, positions, delta = prefill_inputs(
            self.model, config, ids, image, video, msg.image_grid_thw, msg.video_grid_thw, msg.second_per_grid_ts)
        grammar = msg.sampling.grammar
        seq = self.engine.add(embeds, positions, delta, msg.sampling, self.tokenizer.eos_token_ids, ids,
                              self.grammars.constraint(grammar) if grammar is not None else None)
        return seq, stream

    def publish(self, seqs: list[Sequence]) -> None:
        """One Tokens message for the sequences' new tokens, then a Finish (or Error) message for each that ended."""
        entries, ended = [], []
        for seq in seqs:
            stream = self.streams.pop(id(seq)) if seq.error is not None else self.streams[id(seq)]
            if seq.error is not None:
                self.fail(stream.id, seq.error)
                continue
            if not stream.first_token_at:
                stream.first_token_at = time.perf_counter()
                stream.timings["prefill_s"] = stream.first_token_at - stream.started
            delta, stopped = stream.advance(self.tokenizer, seq.tokens, seq.finish_reason is not None)
            if stopped:
                seq.finish_reason = "stop"  # the engine frees the row before its next step
            entries.append(TokenEntry(stream.id, [seq.tokens[-1]], delta, seq.logprobs[-1:]))
            if seq.finish_reason is not None:
                del self.streams[id(seq)]
                ended.append((stream, seq.finish_reason, len(seq.tokens)))
        if entries:
            self.send(Tokens(entries))
        for args in ended:
            self.finish(*args)

    def cancel(self, rid: str) -> None:
        """Drops a request the front end no longer wants, queued or decoding, and acknowledges with a Finish."""
        for i, (msg, _) in enumerate(self.pending):
            if msg.id == rid:
                del self.pending[i]
                return self.finish(Stream(rid, len(msg.prompt_ids), {}), "cancelled", 0)
        prefilling = [self.engine.prefilling.seq] if self.engine.prefilling is not None else []
        for seq in self.engine.active + prefilling:
            stream = self.streams.get(id(seq))
            if stream is not None and stream.id == rid:
                seq.finish_reason = "cancelled"
                del self.streams[id(seq)]
                return self.finish(stream, "cancelled", len(seq.tokens))

    def finish(self, stream: Stream, reason: str, n: int) -> None:
        decode_s = time.perf_counter() - stream.first_token_at
        timings = {k: v for k, v in stream.timings.items() if k != "sent_at"}
        timings["decode_tokens_per_s"] = (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0
        self.send(Finish(stream.id, reason, stream.prompt_tokens, n, timings))

    def fail(self, rid: str | None, error: Exception) -> None:
        print(f"llm worker: request {rid}: {error}", file=sys.stderr)
        if rid:
            self.send(error_message(rid, error))

    def send(self, msg: Message) -> None:
        self.frontend.send(self.results, [self.name.encode(), *encode(msg)])
        if isinstance(msg, (Finish, Error)):
            self.open.discard(msg.id)
