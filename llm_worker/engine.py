"""Generation: prefill each request into its own KV-cache row, then decode every active request together.

Active requests occupy cache rows 0..n-1; when one finishes, the last row moves into its place, so a decode step
always works on a contiguous block of rows. The engine needs only a model with `new_cache`, `__call__`
(embeds, positions, slots, cache, logits_at, first_row) and `embed`, so it is tested with a mock model.

Between a row's logits and its draw stand, when its SamplingParams ask: the grammar's mask (a Constraint: which
tokens keep the text on the grammar), logit_bias, then the repetition, frequency and presence penalties, then
temperature, top-k and top-p (vLLM's order). Log-probabilities are those of the raw logits, as vLLM reports them.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from common.messages import Logprob, SamplingParams

LOGPROB_FLOOR = -9999.0  # a log-probability of -inf is reported as this (JSON has no infinity), as vLLM does


def argmax_rows(logits: Tensor) -> list[int]:
    """The index of the largest logit of each row of (B, vocab), the first one on ties as torch.argmax. On CPU,
    numpy's vectorised argmax takes a 152k vocabulary in a tenth of the time torch's does."""
    if logits.device.type == "cpu":
        return logits.numpy().argmax(-1).tolist()
    return logits.argmax(-1).tolist()


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from logits (vocab,): temperature, then top-k, then top-p, as transformers orders them.

    In float32, shifted so the largest logit is 0 before dividing by the temperature (at least float32's smallest
    normal number): every accepted temperature gives finite probabilities, the best token's at least exp(0) = 1 before
    normalising, so multinomial always has something to draw. Non-finite logits (an overflowing low-precision
    model) are clamped rather than poisoning the draw."""
    if params.temperature == 0:
        return argmax_rows(logits[None])[0]
    logits = torch.nan_to_num(logits.float(), nan=float("-inf"))
    if not torch.isfinite(logits.max()):  # all -inf (NaN) or some +inf: argmax is the only sound draw
        return argmax_rows(logits[None])[0]
    temperature = max(params.temperature, torch.finfo(torch.float32).tiny)  # 5e-324 is 0 in float32: 0/0 is NaN
    logits = (logits - logits.max()) / temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits)  # ascending
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - params.top_p
        drop[-1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


class Constraint(Protocol):
    """A grammar's state along one sequence (llm_worker/grammar.py)."""

    def allowed(self, vocab: int) -> Tensor:
        """(vocab,) bool: the tokens that keep the text on the grammar (only EOS once it is complete)."""

    def accept(self, token: int) -> None:
        """Advances past the drawn token; a ValueError when it breaks the grammar."""


@dataclass
class Sequence:
    params: SamplingParams
    eos_token_ids: frozenset[int]
    delta: int  # M-RoPE: token at slot n has position n + delta
    length: int  # slots written so far
    prompt_ids: tuple[int, ...] = ()  # what repetition_penalty counts besides the output
    constraint: Constraint | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)  # one a token when params.logprobs is set
    generator: torch.Generator | None = None
    finish_reason: str | None = None  # "stop", "length", "error" (then error says why)
    error: Exception | None = None
    counts: Tensor | None = None  # (vocab,) float32: each token's count in the output, for the penalties
    seen: Tensor | None = None  # (vocab,) bool: tokens of the prompt or the output, for repetition_penalty
    bias: tuple[Tensor, Tensor] | None = None  # logit_bias as (token ids, biases)

    def push(self, token: int, max_len: int) -> None:
        if self.constraint is not None and token not in self.eos_token_ids:
            self.constraint.accept(token)  # first: a token that breaks the grammar is never part of the output
        self.tokens.append(token)
        if self.counts is not None:
            self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True
        if token in self.eos_token_ids and not self.params.ignore_eos:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.params.max_new_tokens or self.length >= max_len:
            self.finish_reason = "length"

    def adjust(self, logits: Tensor) -> Tensor:
        """(vocab,) logits → float32 logits after the grammar's mask, logit_bias and the penalties."""
        p, vocab = self.params, logits.shape[-1]
        logits = logits.float().clone()
        if self.constraint is not None:
            logits.masked_fill_(~self.constraint.allowed(vocab).to(logits.device), float("-inf"))
        if p.logit_bias:
            if self.bias is None:  # built once: (ids, biases)
                ids = torch.tensor(list(p.logit_bias), device=logits.device)
                if int(ids.max()) >= vocab:
                    raise ValueError(f"logit_bias names token {int(ids.max())}, past this model's {vocab} logits")
                self.bias = ids, torch.tensor(list(p.logit_bias.values()), device=logits.device)
            logits[self.bias[0]] += self.bias[1]
        if p.repetition_penalty != 1:
            if self.seen is None:
                self.seen = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
                self.seen[torch.tensor([*self.prompt_ids, *self.tokens], dtype=torch.long, device=logits.device)] = True
            picked = logits[self.seen]
            logits[self.seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        if p.frequency_penalty or p.presence_penalty:
            if self.counts is None:
                self.counts = torch.zeros(vocab, device=logits.device)
                self.counts.index_add_(0, torch.tensor(self.tokens, dtype=torch.long, device=logits.device),
                                       torch.ones(len(self.tokens), device=logits.device))
            logits -= p.frequency_penalty * self.counts + p.presence_penalty * (self.counts > 0)
        return logits

    def choose(self, logits: Tensor, best: int | None = None) -> int:
        """The next token from this row's raw logits (vocab,); best is their argmax when the caller has it. With
        params.logprobs set, the token's log-probability (and the top ones) is recorded first."""
        p = self.params
        if p.adjusts_logits or self.constraint is not None:
            token = sample(self.adjust(logits), p, self.generator)
        elif p.temperature == 0 and best is not None:
            token = best
        else:
            token = sample(logits, p, self.generator)
        if p.logprobs is not None:
            logprobs = torch.log_softmax(logits.float(), -1).clamp(min=LOGPROB_FLOOR)
            top = torch.topk(logprobs, p.logprobs) if p.logprobs else None
            self.logprobs.append(Logprob(float(logprobs[token]), list(zip(top.indices.tolist(), top.values.tolist()))
                                         if top is not None else []))
        return token


@dataclass
class Prefill:
    """A prompt being prefilled a chunk at a time, into the row after the active ones."""

    seq: Sequence
    row: int
    embeds: Tensor  # (S, C)
    positions: Tensor  # (3, S)
    done: int = 0  # tokens prefilled so far


class Engine:
    def __init__(self, model, max_batch: int = 8, max_len: int = 4096, prefill_chunk: int = 0):
        self.model = model
        self.max_len = max_len
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk  # a longer prompt is prefilled this many tokens a step (0: all at once)
        self.cache = model.new_cache(max_batch, max_len)
        self.active: list[Sequence] = []  # active[i] owns cache row i
        self.prefilling: Prefill | None = None  # owns row len(active)

    def can_add(self) -> bool:
        self.release_finished()
        return self.prefilling is None and len(self.active) < self.max_batch

    @torch.inference_mode()
    def add(self, embeds: Tensor, positions: Tensor, delta: int, params: SamplingParams, eos_token_ids,
            prompt_ids=(), constraint: Constraint | None = None) -> Sequence:
        """Takes one prompt (embeds (S, C), positions (3, S); prompt_ids its S token ids, for repetition_penalty)
        into a free row. A prompt within prefill_chunk is prefilled now and its first token sampled; a longer one is
        prefilled a chunk per step(), between decode steps of the others, and has no token until its last chunk."""
        S = embeds.shape[0]
        if S + 1 > self.max_len:
            raise ValueError(f"prompt of {S} tokens leaves no room in a context of {self.max_len} tokens")
        if not self.can_add():
            raise RuntimeError(f"engine is full ({self.max_batch} requests, or one still prefilling)")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(params.seed)
        seq = Sequence(params, frozenset(eos_token_ids), delta, S, tuple(prompt_ids), constraint, generator=generator)
        prefill = Prefill(seq, len(self.active), embeds, positions)
        if self.prefill_chunk and S > self.prefill_chunk:
            self.prefilling = prefill
        else:
            self.advance(prefill, S)
        return seq

    def advance(self, p: Prefill, n: int) -> bool:
        """Prefills the next n tokens of p; after the last, samples its first token and makes it active."""
        a, b = p.done, min(p.done + n, p.embeds.shape[0])
        slots = torch.arange(a, b, device=self.model.device)[None]
        logits = self.model(p.embeds[None, a:b], p.positions[:, None, a:b], slots, self.cache,
                            logits_at=torch.tensor([b - a - 1], device=self.model.device), first_row=p.row)
        p.done = b
        if b < p.embeds.shape[0]:
            return False
        p.seq.push(p.seq.choose(logits[0]), self.max_len)  # before the row is taken: a failure leaves no half row
        self.active.append(p.seq)
        return True

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """One chunk of the prompt being prefilled, if any, then one decode token for every active sequence; returns
        the sequences that got a token (or failed)."""
        self.release_finished()
        out = []
        decoding = len(self.active)
        if (p := self.prefilling) is not None:
            try:
                done = self.advance(p, self.prefill_chunk)
            except Exception as e:  # this prompt fails alone; the others decode on
                p.seq.finish_reason, p.seq.error, done = "error", e, True
                out.append(p.seq)
            if done:
                self.prefilling = None
        if not decoding:
            return out + self.active[decoding:]
        device = self.model.device
        batch = self.active[:decoding]  # rows 0..decoding-1; a prompt that just finished prefilling has its token
        last = torch.tensor([s.tokens[-1] for s in batch], device=device)
        slots = torch.tensor([[s.length] for s in batch], device=device)  # (B, 1)
        positions = (slots + torch.tensor([[s.delta] for s in batch], device=device))[None].expand(3, -1, -1)
        logits = self.model(self.model.embed(last[:, None]), positions, slots, self.cache)[:, -1]  # (B, vocab)
        greedy = argmax_rows(logits)  # one pass for the whole batch
        for seq, row_logits, best in zip(batch, logits, greedy):
            seq.length += 1
            try:
                seq.push(seq.choose(row_logits, best), self.max_len)
            except Exception as e:  # this sequence fails alone; the batch goes on
                seq.finish_reason, seq.error = "error", e
        return out + list(self.active)

    def abort_all(self, error: Exception) -> list[Sequence]:
        """Ends every active sequence with `error` (a step that failed as a whole) and frees the rows."""
        failed = self.active + ([self.prefilling.seq] if self.prefilling is not None else [])
        for seq in failed:
            seq.finish_reason, seq.error = "error", error
        self.active.clear()
        self.prefilling = None
        return failed

    def release_finished(self) -> None:
        """Frees the rows of finished sequences, moving the last rows into the gaps (and the prompt being prefilled
        into the row after them)."""
        i = 0
        while i < len(self.active):
            if self.active[i].finish_reason is None:
                i += 1
                continue
            last = len(self.active) - 1
            if i != last:
                self.cache.move_row(last, i)
                self.active[i] = self.active[last]
            self.active.pop()
        if (p := self.prefilling) is not None:
            if p.seq.finish_reason is not None:  # cancelled while prefilling
                self.prefilling = None
            elif p.row != len(self.active):
                self.cache.move_row(p.row, len(self.active))
                p.row = len(self.active)

    def generate(
        self, embeds: Tensor, positions: Tensor, delta: int, params: SamplingParams, eos_token_ids
    ) -> Iterator[tuple[int, str | None]]:
        """One request alone: yields (token, finish reason or None) as tokens come."""
        seq = self.add(embeds, positions, delta, params, eos_token_ids)
        while not seq.tokens and seq.error is None:
            self.step()
        if seq.error is not None:
            raise seq.error
        yield seq.tokens[-1], seq.finish_reason
        while seq.finish_reason is None:
            self.step()
            if seq.error is not None:
                raise seq.error
            yield seq.tokens[-1], seq.finish_reason
        self.release_finished()
