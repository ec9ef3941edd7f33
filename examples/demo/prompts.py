"""What the demo model is asked: each scene's questions as chat prompts, by tag (TAGS), and where a prompt's parts (a
span, an option, the question's colour and kind words) sit in its token ids once the image pad is expanded."""

import math
import random
import re
from collections import defaultdict
from dataclasses import dataclass

from common.tokenizer import Tokenizer
from examples.demo.tasks import (COLOURS, KINDS, OPEN_CATEGORIES, PLURALS, Cells, Scene, choice_questions, counted,
                                 open_questions)
from frontend.eval import mcq_prompt
from llm_worker.inputs import expand_vision_pads

TAGS = [f"open {c}" for c in OPEN_CATEGORIES] + ["mcq colour", "mcq count", "mcq text", "mcq position"]
SCENE_CATEGORIES = ("colour", "count", "text", "grounding", "position")  # what a scene can be made for
KEY_WORDS = re.compile(r" (" + "|".join([*COLOURS, *PLURALS.values(), *KINDS]) + r")\b")


@dataclass(frozen=True)
class PromptedQuestion:
    """A question of examples.demo.tasks as the model is asked it."""

    prompt: str  # the text after the image: the question itself, or the multiple-choice prompt around it
    question: str  # the question's own words, as they stand in the prompt
    answer: str  # the expected answer: its text, or the right option's letter
    cells: Cells  # where the answer is to be read (tasks.Question.cells)
    options: tuple[str, ...] | None  # the options A-D of a multiple-choice question


def scene_questions(scene: Scene, rng: random.Random, category: str) -> dict[str, list[PromptedQuestion]]:
    """The questions the scene answers, by tag. A scene made for counting is asked only its `counted` question, as in
    the held-out rows."""
    asked = lambda q: q.category != "count" or category != "count" or q.question == counted(scene)
    out = defaultdict(list)
    for q in filter(asked, open_questions(scene)):
        out[f"open {q.category}"].append(PromptedQuestion(q.question, q.question, q.answer, q.cells, None))
    for c in filter(asked, choice_questions(scene, rng)):
        prompt = mcq_prompt(c.question, c.hint, dict(zip("ABCD", c.options)))
        out[f"mcq {c.category}"].append(PromptedQuestion(prompt, c.question, c.answer, c.cells, c.options))
    return out


def chat_text(tokenizer: Tokenizer, prompt: str) -> str:
    """The chat template over one image and `prompt`, default system prompt, one image pad."""
    return tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}])


def chat_ids(tokenizer: Tokenizer, grid: list[int], text: str) -> list[int]:
    """The ids of chat_text(…) as the language model sees them: its one image pad expanded to one pad a visual token
    (a merged 2x2 of the grid's patches)."""
    return expand_vision_pads(tokenizer.encode(text), [grid], [], tokenizer.image_pad_id, tokenizer.video_pad_id)


def span_positions(tokenizer: Tokenizer, grid: list[int], text: str, start: int, end: int) -> list[int]:
    """Where text[start:end] (from a word boundary of the tokenizer to another) sits in the ids of the chat text
    `text` once its image pad is expanded."""
    first, last = len(tokenizer.encode(text[:start])), len(tokenizer.encode(text[:end]))
    shift = math.prod(grid) // 4 - 1  # the image pad before them expands to one pad a visual token
    return list(range(first + shift, last + shift))


def option_positions(tokenizer: Tokenizer, grid: list[int], text: str, letter: str, option: str) -> list[int]:
    """Where the text of option `letter` sits in chat_ids(tokenizer, grid, text)."""
    start = text.index(f"\n{letter}. {option}\n") + 3  # the space before the option
    return span_positions(tokenizer, grid, text, start, start + 1 + len(option))


def key_positions(tokenizer: Tokenizer, grid: list[int], text: str, question: str) -> list[int]:
    """Where the colour and kind words of `question` sit in chat_ids(tokenizer, grid, text) (none for the text)."""
    at = text.index(question)
    return [p for m in KEY_WORDS.finditer(question) for p in span_positions(tokenizer, grid, text, at + m.start(), at + m.end())]
