"""The task vocabulary: the few hundred token ids the task prompts and answers use, and the tied embedding as training
sees it, those rows trained and every other row held at zero."""

import math
import random

import torch
from torch import nn

from common.tokenizer import Tokenizer
from examples.demo.model import IM_END, PAD
from examples.demo.prompts import SCENE_CATEGORIES, chat_ids, chat_text, scene_questions
from examples.demo.tasks import make_scene

# A task word's embedding is drawn at std EMBED_STD so that it stays visible in its residual stream: at model.INIT_STD
# the first layer's output drowns it, no answer can read the question, and only question-blind answers are learned.
EMBED_STD = 1.0


def task_token_ids(tokenizer: Tokenizer, seed: int, scenes: int = 3000) -> list[int]:
    """Every token the task prompts and answers use, gathered from many scenes; a batch with any other fails loudly."""
    rng, ids = random.Random(f"vocabulary {seed}"), {PAD}
    for _ in range(scenes):
        category = rng.choice(SCENE_CATEGORIES)
        for questions in scene_questions(make_scene(rng, category), rng, category).values():
            for q in questions:
                ids.update(chat_ids(tokenizer, [1, 2, 2], chat_text(tokenizer, q.prompt)), tokenizer.encode(q.answer), [IM_END])
    return sorted(ids)


class TaskVocabulary(nn.Module):
    """The tied embedding as training sees it: rows for the tokens the tasks use are trained, every other row stays
    zero, so its logit is exactly 0 and the full 151,936-way softmax needs only one log(count) term for all of them.
    That is the same loss as a full-vocabulary softmax over the saved matrix, at the cost of a few hundred rows."""

    def __init__(self, embedding: nn.Embedding, ids: list[int], trained: bool):
        super().__init__()
        self.ids = torch.tensor(ids)
        self.index = torch.full((embedding.num_embeddings,), -1)
        self.index[self.ids] = torch.arange(len(ids))
        fresh = torch.randn(len(ids), embedding.embedding_dim) * EMBED_STD  # drawn either way: one stream of weights
        self.table = nn.Parameter(embedding.weight[self.ids].detach().clone() if trained else fresh)  # (task tokens, hidden)
        self.log_zero_mass = math.log(embedding.num_embeddings - len(ids))

    def rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        rows = self.index[token_ids]
        if (rows < 0).any():
            raise ValueError(f"token ids {sorted(set(token_ids[rows < 0].tolist()))} are not in the task vocabulary")
        return rows

    def log_probs(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, hidden) -> logits and log-probabilities over the full vocabulary, for the task tokens: (n, task tokens)."""
        logits = hidden @ self.table.T
        log_norm = torch.logaddexp(torch.logsumexp(logits, -1), torch.tensor(self.log_zero_mass))
        return logits, logits - log_norm[:, None]

    def write_into(self, embedding: nn.Embedding) -> None:
        with torch.no_grad():
            embedding.weight.zero_()
            embedding.weight[self.ids] = self.table
