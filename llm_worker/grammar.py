"""Constrained decoding: a request's grammar (SamplingParams.grammar, llguidance's serialized form, made by the front
end from response_format or a forced tool call) held as an llguidance matcher that says, at each step, which tokens
keep the text on the grammar. The engine masks the rest before its draw (llm_worker/engine.py Constraint)."""

import llguidance
import numpy as np
import torch
from torch import Tensor


class Grammars:
    """Builds one Constraint per request; the tokenizer's token table is built once, at the first grammar (about 2 s
    for Qwen's 151k tokens)."""

    def __init__(self, tokenizer_json: str, vocab: int, eos_token_ids: list[int]):
        self.tokenizer_json, self.vocab, self.eos_token_ids = tokenizer_json, vocab, eos_token_ids
        self.tokenizer: llguidance.LLTokenizer | None = None

    def constraint(self, grammar: str) -> "Constraint":
        if self.tokenizer is None:
            self.tokenizer = llguidance.LLTokenizer(self.tokenizer_json, n_vocab=self.vocab,
                                                    eos_token=self.eos_token_ids[0])
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"the grammar cannot be used: {matcher.get_error()}")
        return Constraint(matcher, self.eos_token_ids)


class Constraint:
    def __init__(self, matcher: llguidance.LLMatcher, eos_token_ids: list[int]):
        self.matcher, self.eos_token_ids = matcher, eos_token_ids

    def allowed(self, vocab: int) -> Tensor:
        """(vocab,) bool; once the grammar is complete, every EOS token (llguidance allows its own one only)."""
        if self.matcher.is_error():
            raise ValueError(f"the output left its grammar: {self.matcher.get_error()}")
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        mask = torch.from_numpy(bits[:vocab].astype(bool))
        if self.matcher.is_accepting():
            mask[self.eos_token_ids] = True
        return mask

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise ValueError(f"token {token} breaks the request's grammar: {self.matcher.get_error()}")
