"""The attention heads the training teaches where to look, each the first head of its layer: the attention mass each
puts on its target in one example, and the loss over all of them. `attentions` is the language model's attention
weights, a (B, heads, L, L) tensor per layer; `b` the example's row in the batch."""

import torch

from examples.demo.batch import Example

QUESTION_LAYER = 1  # its head is taught to read the question's colour and kind words
COMPARE_LAYER = 2  # its head is taught, at each character of a text option, to read the box's character in the same
# place; a probe on its output asks whether the two are the same character
FOCUS_LAYER = 3  # its head is taught where each answer is to be read
GATHER_LAYER = 4  # its head is taught, at a text option's last character, to read the option's three characters: a
# probe on the input of OPTION_LAYER asks there whether all three match, which the option head can look for
OPTION_LAYER = 5  # its head is taught which option of a multiple-choice prompt is right


def question_head_masses(attentions, b: int, example: Example) -> list[torch.Tensor]:
    """At every position that predicts an answer token, the question head's attention on the question's colour and kind
    words (none for the text)."""
    if not example.question_words:
        return []
    predicting = attentions[QUESTION_LAYER][b, 0, example.answer_start - 1: len(example.ids) - 1]  # (answer, L)
    return list(predicting[:, example.question_words].sum(-1))


def focus_head_masses(attentions, b: int, example: Example, image_positions: torch.Tensor) -> list[torch.Tensor]:
    """At the position that predicts each answer token, the focus head's attention on the visual tokens the token is to
    be read from; image_positions: where the example's visual tokens sit in its ids."""
    start = example.answer_start
    return [attentions[FOCUS_LAYER][b, 0, start - 1 + k, image_positions[f]].sum() for k, f in enumerate(example.focus) if f]


def option_head_masses(attentions, b: int, example: Example) -> list[torch.Tensor]:
    """Where the letter of a multiple-choice answer is given, the option head's attention on the right option's text."""
    if not example.right_option:
        return []
    return [attentions[OPTION_LAYER][b, 0, example.answer_start - 1, example.right_option].sum()]


def compare_head_masses(attentions, b: int, example: Example, image_positions: torch.Tensor) -> list[torch.Tensor]:
    """At each character of a text option, the compare head's attention on the box's character in the same place."""
    at = [m.position for m in example.character_matches]
    box = [m.visual_token for m in example.character_matches]
    return list(attentions[COMPARE_LAYER][b, 0, at, image_positions[box]])


def gather_head_masses(attentions, b: int, example: Example) -> list[torch.Tensor]:
    """At each text option's last character, the gather head's attention on the option's characters."""
    return [attentions[GATHER_LAYER][b, 0, option[-1].position, [m.position for m in option]].sum()
            for option in example.text_options]


def attention_loss(masses: list[torch.Tensor]) -> torch.Tensor:
    """Each taught head puts its attention where it was told to: the mean of -log(mass) over every target."""
    return -torch.log(torch.stack(masses) + 1e-6).mean()
