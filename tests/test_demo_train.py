"""The demo training's supervision targets point at what they claim to: the question's words, the right option, the
box's characters and which option characters match them. (Training itself runs for an hour; these check the batches it
learns from.)"""

import random

import pytest

from common.tokenizer import Tokenizer
from examples.demo.tasks import CHARACTERS, COLOURS, KINDS, PLURALS, QUARTERS
from examples.demo.batch import sample_batch
from examples.demo.model import PREPROCESS
from examples.demo.probes import CELL_LABELS, cell_places


@pytest.fixture(scope="module")
def batch(tokenizer_dir):
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    return tokenizer, sample_batch(random.Random(7), tokenizer, PREPROCESS, 16, 8)


def test_supervision_targets_point_at_the_question_words_the_right_option_and_the_box(batch):
    tokenizer, batch = batch
    grids, labels = batch.grids, batch.cell_labels
    first = [0, *(grids.prod(-1) // 4).cumsum(0).tolist()]  # each image's first row in labels
    char = labels[:, list(CELL_LABELS).index("char")]
    places = cell_places(grids)
    seen = set()
    for example in batch.examples:
        i, ids, n, tag, focus = example.image, example.ids, example.answer_length, example.tag, example.focus
        keys, option, compare = example.question_words, example.right_option, example.character_matches
        seen.add(tag)
        prompt = tokenizer.decode(ids[:-n])
        question = prompt.split("Question: ")[-1] if tag.startswith("mcq") else prompt
        words = tokenizer.decode([ids[k] for k in keys]).split()
        if tag.endswith("text"):
            assert words == []
        else:
            assert words and all(w in (*COLOURS, *KINDS, *PLURALS.values()) and f" {w}" in question for w in words)
        answer = tokenizer.decode(ids[-n:-1])
        if tag.startswith("mcq"):
            right = prompt.split(f"\n{answer}. ")[1].split("\n")[0]
            assert tokenizer.decode([ids[p] for p in option]).strip() == right
        else:
            assert option == []
        if tag == "mcq text":
            cells = focus[0]  # the letter is read from the whole box
            box = [CHARACTERS[char[first[i] + cell] - 1] for cell in cells]
            assert "".join(box) == right and len(compare) == 12
            for k, (at, cell, same) in enumerate(compare):  # four options, three characters each, in place order
                character = tokenizer.decode([ids[at]]).strip()
                assert cell == cells[k % 3] and character in CHARACTERS and same == (character == box[k % 3])
            options = [tokenizer.decode([ids[at] for at, *_ in compare[k: k + 3]]).replace(" ", "") for k in range(0, 12, 3)]
            assert [all(same for *_, same in compare[k: k + 3]) for k in range(0, 12, 3)] == [o == right for o in options]
            assert options.count(right) == 1
        else:
            assert compare == []
        if tag == "mcq position":  # the quarter probe's label of every cell of the shape is the right option
            assert {QUARTERS[places["quarter"][first[i] + cell]] for cell in focus[0]} == {right}
    assert {"open colour", "open count", "open grounding", "mcq text", "mcq position"} <= seen


def test_tag_weights_change_the_question_mix(tokenizer_dir):
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    tags = lambda weights: [e.tag for e in sample_batch(random.Random(3), tokenizer, PREPROCESS, 16, 4, weights).examples]
    assert "mcq text" in tags(None) and "mcq text" not in tags({"mcq text": 0.0})
    assert tags({"mcq text": 50.0}).count("mcq text") > 2 * tags(None).count("mcq text")
