"""A training batch: seeded scenes, the questions drawn about them as token ids (Example), and the targets every
probe and taught head of the training is checked against."""

import random
from dataclasses import dataclass
from typing import NamedTuple

import torch

from common.tokenizer import Tokenizer
from examples.demo.model import IM_END
from examples.demo.probes import CELL_LABELS
from examples.demo.prompts import (SCENE_CATEGORIES, PromptedQuestion, chat_ids, chat_text, key_positions,
                                   option_positions, scene_questions)
from examples.demo.tasks import CELL, TEXT_LENGTH, Scene, make_scene
from visual_worker.preprocess import PreprocessConfig, preprocess_images


class CharacterMatch(NamedTuple):
    """One character of a text option, against the box's character in the same place."""

    position: int  # the option character's position in the example's ids
    visual_token: int  # the box's character's visual token, counted within the example's image
    same: bool  # the two are the same character


@dataclass
class Example:
    """One question about one of the batch's images, prompt and answer as token ids, with its heads' targets."""

    image: int  # which of the batch's images it asks about
    ids: list[int]  # the chat prompt (image pad expanded), the answer, IM_END
    answer_length: int  # the answer's ids at the end of `ids`, IM_END included
    tag: str  # one of prompts.TAGS
    focus: list[list[int]]  # the focus head's target: for each answer token, the visual tokens it is read from
    question_words: list[int]  # the question head's target: where the question's colour and kind words sit in `ids`
    right_option: list[int]  # the option head's target: where the right option's text sits in a multiple-choice prompt
    character_matches: list[CharacterMatch]  # "mcq text" only, the compare head's and the gather head's target and
    # the same-character and right-option probes': each option's characters, TEXT_LENGTH an option, in option order

    @property
    def answer_start(self) -> int:
        return len(self.ids) - self.answer_length

    @property
    def text_options(self) -> list[list[CharacterMatch]]:
        """character_matches option by option: the gather head reads each option's characters at its last one."""
        matches = self.character_matches
        return [matches[k: k + TEXT_LENGTH] for k in range(0, len(matches), TEXT_LENGTH)]


@dataclass
class Batch:
    """What one training step learns from: the images as the visual worker sees them and the questions about them."""

    pixels: torch.Tensor  # (patches, 3 * 2 * 14 * 14): every image's patches, as the visual worker makes them
    grids: torch.Tensor  # (images, 3): each image's (t, h, w) in patches
    cell_labels: torch.Tensor  # (visual tokens, len(CELL_LABELS)): what each image's cells hold, images in order
    examples: list[Example]


def sample_batch(rng: random.Random, tokenizer: Tokenizer, preprocess: PreprocessConfig, images: int, per_image: int,
                 weights: dict[str, float] | None = None) -> Batch:
    """`images` scenes, each made for a category drawn at random, and `per_image` questions about each, tags drawn
    from those the scene answers (evenly, or in proportion to `weights`, 1 for a tag not named)."""
    scenes, drawn = [], []  # drawn: (image, tag, question)
    for i in range(images):
        category = rng.choice(SCENE_CATEGORIES)
        scenes.append(make_scene(rng, category))
        pool = scene_questions(scenes[-1], rng, category)
        tags = sorted(pool)
        drawn_tags = rng.choices(tags, [(weights or {}).get(t, 1.0) for t in tags], k=per_image)
        drawn += [(i, tag, rng.choice(pool[tag])) for tag in drawn_tags]
    pixels, grids = preprocess_images([scene.draw() for scene in scenes], preprocess)
    labels = torch.cat([torch.tensor([scene.cell_labels()[name] for name in CELL_LABELS]).T for scene in scenes])
    examples = [make_example(tokenizer, scenes[i], grids[i].tolist(), i, tag, q) for i, tag, q in drawn]
    return Batch(torch.from_numpy(pixels), torch.from_numpy(grids), labels, examples)


def make_example(tokenizer: Tokenizer, scene: Scene, grid: list[int], image: int, tag: str,
                 q: PromptedQuestion) -> Example:
    """The Example of question `q` about `scene`, image `image` of its batch, seen as `grid`."""
    target = tokenizer.encode(q.answer) + [IM_END]
    cell_tokens = [r * (scene.size[0] // CELL) + c for c, r in q.cells]
    if tag == "open text":  # each character from its own cell, the end from all three
        focus = [[t] for t in cell_tokens] + [cell_tokens] * (len(target) - len(cell_tokens))
    else:
        focus = [cell_tokens] * len(target)
    text = chat_text(tokenizer, q.prompt)
    right_option, character_matches = [], []
    if q.options is not None:
        right = q.options["ABCD".index(q.answer)]
        right_option = option_positions(tokenizer, grid, text, q.answer, right)
    if tag == "mcq text":  # the box's characters are the right option's, cell_tokens the box's cells
        for letter, option in zip("ABCD", q.options):
            at = option_positions(tokenizer, grid, text, letter, option)[-TEXT_LENGTH:]  # a space before a digit is a token
            character_matches += [CharacterMatch(position, token, mine == box)
                                  for position, token, mine, box in zip(at, cell_tokens, option, right, strict=True)]
    return Example(image, chat_ids(tokenizer, grid, text) + target, len(target), tag, focus,
                   key_positions(tokenizer, grid, text, q.question), right_option, character_matches)
