"""The synthetic tasks the demo model learns and is scored on: seeded, answers true to the pixels drawn, files in
the VLMEvalKit layout that `launch.py eval` reads."""

import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.tokenizer import Tokenizer
from examples.demo.tasks import (CELL, CHARACTERS, COLOURS, KINDS, MCQ_CATEGORIES, OPEN_CATEGORIES, PLURALS, QUARTERS, SIZES, choice_questions,
                                 make_scene, open_questions, write_tsvs)
from frontend.eval import parse_box, read_tsv


ROOT = Path(__file__).resolve().parents[1]


def scenes(n=40, seed=0):
    rng = random.Random(seed)
    return [make_scene(rng, rng.choice(OPEN_CATEGORIES + ("position",))) for _ in range(n)]


def test_the_same_seed_gives_the_same_files(tmp_path):
    a = write_tsvs(tmp_path / "a", seed=5, rows=8)
    b = write_tsvs(tmp_path / "b", seed=5, rows=8)
    c = write_tsvs(tmp_path / "c", seed=6, rows=8)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b] != [p.read_bytes() for p in c]


def test_the_same_seed_gives_the_same_files_in_any_process(tmp_path):
    """Held-out files are named by their seed alone, so no run-to-run state (Python's hash seed) may change them."""
    for hash_seed in ("1", "2"):
        subprocess.run([sys.executable, "-m", "examples.demo.tasks", "tsv", "--seed", "5", "--rows", "40", "--out",
                        str(tmp_path / hash_seed)], cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": hash_seed}, check=True,
                       capture_output=True)
    for name in ("mcq.tsv", "open.tsv"):
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes()


def test_images_are_sized_in_multiples_of_28_with_several_windows():
    for scene in scenes():
        assert scene.size in SIZES and all(side % 28 == 0 and side >= 224 for side in scene.size)


def test_a_grounding_box_holds_exactly_the_shapes_pixels():
    for scene in scenes():
        pixels = np.asarray(scene.draw()).astype(int)
        for q in open_questions(scene):
            if q.category != "grounding":
                continue
            x1, y1, x2, y2 = json.loads(q.answer)["bbox_2d"]
            colour = COLOURS[json.loads(q.answer)["label"].split()[0]]
            ys, xs = np.nonzero((np.abs(pixels - colour).sum(-1) < 30))
            inside = (xs >= x1 - 1) & (xs <= x2 + 1) & (ys >= y1 - 1) & (ys <= y2 + 1)
            assert inside.any()
            assert abs(xs[inside].min() - x1) <= 1 and abs(xs[inside].max() - x2) <= 1
            assert abs(ys[inside].min() - y1) <= 1 and abs(ys[inside].max() - y2) <= 1


def test_counts_and_colours_agree_with_the_scene():
    for scene in scenes():
        for q in open_questions(scene):
            if q.category == "count":
                kind = next(k for k, plural in PLURALS.items() if f" {plural} " in q.question)
                assert int(q.answer) == sum(s.kind == kind for s in scene.shapes)
            if q.category == "colour":
                kind = q.question.removeprefix("What colour is the ").removesuffix("?")
                assert [s.colour for s in scene.shapes if s.kind == kind] == [q.answer]


def test_a_choice_answer_names_the_open_answer_or_the_quarter():
    rng = random.Random(1)
    for scene in scenes():
        truth = {q.question: q.answer for q in open_questions(scene)}
        for c in choice_questions(scene, rng):
            chosen = c.options["ABCD".index(c.answer)]
            assert len(set(c.options)) == 4
            if c.category == "position":
                label = c.question.removeprefix("In which part of the image is the ").removesuffix("?")
                box = next(s.box for s in scene.shapes if s.label == label)
                w, h = scene.size
                assert chosen == QUARTERS[2 * (box[1] >= h // 2) + (box[0] >= w // 2)]
            else:
                assert chosen == truth[c.question]


def test_text_is_one_token_a_character(tokenizer_dir):
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    texts = [q.answer for scene in scenes(80) for q in open_questions(scene) if q.category == "text"]
    assert texts and all(len(tokenizer.encode(t)) == len(t) == 3 for t in texts)


def test_files_read_back_with_every_category(tmp_path):
    mcq, opened = write_tsvs(tmp_path, seed=3, rows=8)
    choices, answers = read_tsv(mcq), read_tsv(opened)
    assert {r.category for r in choices} == set(MCQ_CATEGORIES)
    assert {r.category for r in answers} == set(OPEN_CATEGORIES)
    assert all(r.answer in r.options and len(r.options) == 4 for r in choices)
    grounding = [r for r in answers if r.category == "grounding"]
    assert grounding and all(parse_box(r.answer) is not None for r in grounding)
    for r in choices + answers:
        assert Image.open(io.BytesIO(r.images[0])).size in SIZES


@pytest.mark.parametrize("category", OPEN_CATEGORIES + ("position",))
def test_every_category_can_be_asked(category):
    rng = random.Random(2)
    scene = make_scene(rng, category)
    asked = [q.category for q in open_questions(scene)] + [c.category for c in choice_questions(scene, rng)]
    assert category in asked


def test_cell_labels_name_what_each_visual_token_shows():
    """The auxiliary training targets: a cell labelled with a shape holds pixels of its colour, the shape's top left
    cell is its anchor, and the text's characters sit in consecutive cells of one row."""
    for scene in scenes():
        labels, pixels = scene.cell_labels(), np.asarray(scene.draw()).astype(int)
        cols = scene.size[0] // CELL
        assert all(len(v) == cols * (scene.size[1] // CELL) for v in labels.values())
        assert sum(labels["anchor"]) == len(scene.shapes)
        for i, colour in enumerate(labels["colour"]):
            c, r = i % cols, i // cols
            cell = pixels[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL]
            has = lambda rgb: bool((np.abs(cell - rgb).sum(-1) < 30).any())
            if colour:
                assert has(COLOURS[list(COLOURS)[colour - 1]]) and labels["kind"][i] and labels["span"][i]
            else:
                assert not labels["kind"][i] and not any(has(rgb) for rgb in COLOURS.values())
        for s in scene.shapes:
            assert labels["anchor"][s.cell[1] * cols + s.cell[0]] == 1
        placed = [(i, CHARACTERS[ch - 1]) for i, ch in enumerate(labels["char"]) if ch]
        if scene.text is None:
            assert not placed
        else:
            assert "".join(ch for _, ch in placed) == scene.text and placed[-1][0] - placed[0][0] == len(scene.text) - 1
            assert [labels["place"][i] for i, _ in placed] == list(range(1, len(scene.text) + 1))


def test_question_cells_are_where_the_answer_is_drawn():
    rng = random.Random(4)
    for scene in scenes():
        labels, cols = scene.cell_labels(), scene.size[0] // CELL
        at = lambda name, cell: labels[name][cell[1] * cols + cell[0]]
        for q in open_questions(scene) + choice_questions(scene, rng):
            if q.category == "count":
                kind = next(k for k, plural in PLURALS.items() if f" {plural} " in q.question)
                assert q.cells == tuple(c for s in scene.shapes if s.kind == kind for c in s.cells)
                count = int(q.options["ABCD".index(q.answer)] if hasattr(q, "options") else q.answer)
                assert all(at("count", c) == count and at("kind", c) == KINDS.index(kind) + 1 for c in q.cells)
            elif q.category == "text":
                assert "".join(CHARACTERS[at("char", c) - 1] for c in q.cells) == scene.text
            else:
                label = q.question.rstrip("?").split(" the ")[-1]
                shape = next(s for s in scene.shapes if label in (s.kind, s.label))
                assert q.cells == ((shape.cell,) if q.category == "grounding" else tuple(shape.cells))
                assert all(at("colour", c) == list(COLOURS).index(shape.colour) + 1 for c in q.cells)
