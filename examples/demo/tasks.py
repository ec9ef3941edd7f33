"""Seeded synthetic vision tasks for the demo model: scenes of coloured shapes and a text box, open questions with
short answers (colour, count, text, grounding) and MMBench-style multiple-choice variants, written as VLMEvalKit TSVs.

    python -m examples.demo.tasks tsv --seed 1000 --rows 400 --out results/heldout   # mcq.tsv and open.tsv
    python -m examples.demo.tasks example                                             # examples/images/shapes.png
"""

import argparse
import base64
import csv
import io
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

CELL = 28  # one merged visual token (2x2 patches of 14 px): every object fills whole cells, so each cell is one token
SIZES = ((224, 224), (280, 224), (224, 280))  # (width, height): 8-10 cells a side, 2-3 windows of 112 px
COLOURS = {
    "red": (220, 35, 35), "green": (35, 160, 60), "blue": (35, 75, 225),
    "yellow": (235, 200, 25), "purple": (145, 55, 185), "orange": (245, 130, 25),
}
KINDS = ("circle", "square", "triangle", "star")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
LETTERS, DIGITS = "ACEHKLMPRTXY", "2345679"  # letters and digits alternate, so each character is one Qwen token
CHARACTERS = LETTERS + DIGITS
QUARTERS = ("top left", "top right", "bottom left", "bottom right")
OPEN_CATEGORIES = ("colour", "count", "text", "grounding")
MCQ_CATEGORIES = ("colour", "count", "text", "position")
MAX_COUNT = 4
FONT_SIZE = 20
TEXT_LENGTH = 3  # characters, one a cell
HINTS = {
    "colour": "The shapes are red, green, blue, yellow, purple or orange.",
    "count": "Count the shapes of that kind whatever their colour.",
    "text": "The box holds letters and digits.",
    "position": "The image is split into four equal quarters.",
}

EXAMPLE_IMAGE = Path(__file__).resolve().parents[1] / "images" / "shapes.png"

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels of the image as the model sees it


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    cell: tuple[int, int]  # (column, row) of its top left cell
    span: int  # 1: small, one cell; 2: large, 2x2 cells

    @property
    def label(self) -> str:
        return f"{self.colour} {self.kind}"

    @property
    def box(self) -> Box:
        """The square the shape is drawn in: its cells less a 3-4 px margin."""
        (c, r), s = self.cell, self.span
        return (CELL * c + 3, CELL * r + 3, CELL * (c + s) - 4, CELL * (r + s) - 4)

    @property
    def cells(self) -> list[tuple[int, int]]:
        (c, r), s = self.cell, self.span
        return [(c + i, r + j) for j in range(s) for i in range(s)]


@dataclass
class Scene:
    size: tuple[int, int]  # (width, height)
    background: tuple[int, int, int]
    shapes: list[Shape] = field(default_factory=list)
    text: str | None = None
    text_cell: tuple[int, int] | None = None  # (column, row) of the box's first cell; the box is TEXT_LENGTH cells wide

    @property
    def text_box(self) -> Box | None:
        if self.text_cell is None:
            return None
        c, r = self.text_cell
        return (CELL * c + 1, CELL * r + 1, CELL * (c + TEXT_LENGTH) - 2, CELL * (r + 1) - 2)

    def draw(self) -> Image.Image:
        image = Image.new("RGB", self.size, self.background)
        draw = ImageDraw.Draw(image)
        for s in self.shapes:
            fill = COLOURS[s.colour]
            if s.kind == "circle":
                draw.ellipse(s.box, fill=fill)
            elif s.kind == "square":
                draw.rectangle(s.box, fill=fill)
            else:
                draw.polygon(_outline(s.kind, s.box), fill=fill)
        if self.text is not None:
            draw.rectangle(self.text_box, fill="white", outline="black", width=1)
            font, (c, r) = _font(), self.text_cell
            for i, ch in enumerate(self.text):  # each character centred in its own cell
                left, top, right, bottom = font.getbbox(ch)
                x, y = CELL * (c + i) + CELL / 2, CELL * r + CELL / 2
                draw.text((x - (left + right) / 2, y - (top + bottom) / 2), ch, fill="black", font=font)
        return image

    def png(self) -> bytes:
        buf = io.BytesIO()
        self.draw().save(buf, format="PNG")
        return buf.getvalue()

    def cell_labels(self) -> dict[str, list[int]]:
        """What each cell (one visual token, row-major) holds, as class indices with 0 for nothing: the shape's kind,
        colour and size, whether it is the shape's top left cell, how many shapes of its kind the scene has, the
        character and its place in the text box. Training uses these as auxiliary targets; the model never sees them."""
        cols, rows = self.size[0] // CELL, self.size[1] // CELL
        out = {name: [0] * (cols * rows) for name in ("kind", "colour", "span", "anchor", "count", "char", "place")}
        kinds = [s.kind for s in self.shapes]
        for s in self.shapes:
            for c, r in s.cells:
                i = r * cols + c
                out["kind"][i] = KINDS.index(s.kind) + 1
                out["colour"][i] = list(COLOURS).index(s.colour) + 1
                out["span"][i] = s.span
                out["anchor"][i] = int((c, r) == s.cell)
                out["count"][i] = kinds.count(s.kind)
        if self.text is not None:
            c, r = self.text_cell
            for k, ch in enumerate(self.text):
                out["char"][r * cols + c + k] = CHARACTERS.index(ch) + 1
                out["place"][r * cols + c + k] = k + 1
        return out


Cells = tuple[tuple[int, int], ...]  # (column, row) of grid cells


@dataclass(frozen=True)
class Question:
    category: str  # one of OPEN_CATEGORIES
    question: str
    answer: str
    cells: Cells = ()  # where the answer is to be read: the shape's cells, its top left cell for a box, the text's
    # cells in reading order, the cells of every shape of the kind counted


@dataclass(frozen=True)
class Choice:
    """An MMBench-style multiple-choice question: options A-D, the answer is a letter."""

    category: str  # one of MCQ_CATEGORIES
    question: str
    hint: str | None
    options: tuple[str, ...]
    answer: str
    cells: Cells = ()  # as Question.cells


def _font() -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=FONT_SIZE)


def _outline(kind: str, box: Box) -> list[tuple[float, float]]:
    x1, y1, x2, y2 = box
    if kind == "triangle":
        return [((x1 + x2) / 2, y1), (x2, y2), (x1, y2)]
    # star: five points, inner radius 0.45, stretched to touch all four sides of the box
    unit = [((1 if i % 2 == 0 else 0.45) * math.sin(i * math.pi / 5), -(1 if i % 2 == 0 else 0.45) * math.cos(i * math.pi / 5))
            for i in range(10)]
    xs, ys = zip(*unit)
    return [(x1 + (x - min(xs)) / (max(xs) - min(xs)) * (x2 - x1), y1 + (y - min(ys)) / (max(ys) - min(ys)) * (y2 - y1))
            for x, y in unit]


def _quarter(box: Box, size: tuple[int, int]) -> str | None:
    """The quarter of the image that holds the whole box, or None when it straddles a middle line."""
    (w, h), (x1, y1, x2, y2) = size, box
    col = 0 if x2 < w // 2 else 1 if x1 >= w // 2 else None
    row = 0 if y2 < h // 2 else 1 if y1 >= h // 2 else None
    return None if col is None or row is None else QUARTERS[2 * row + col]


def _random_text(rng: random.Random) -> str:
    """Letters and digits in turn, no character twice."""
    first, second = (LETTERS, DIGITS) if rng.random() < 0.5 else (DIGITS, LETTERS)
    a, c = rng.sample(first, 2)
    return a + rng.choice(second) + c


class _Placer:
    """Random free cells of the image's grid."""

    def __init__(self, rng: random.Random, size: tuple[int, int]):
        self.rng, self.cols, self.rows, self.taken = rng, size[0] // CELL, size[1] // CELL, set()

    def place(self, w: int, h: int, quarter: str | None = None) -> tuple[int, int] | None:
        """The top left cell of a free w x h block of cells, inside `quarter` when given."""
        cs, rs = (0, self.cols - w), (0, self.rows - h)
        if quarter is not None:
            col, row = QUARTERS.index(quarter) % 2, QUARTERS.index(quarter) // 2
            half_c, half_r = self.cols // 2, self.rows // 2
            cs = (0, half_c - w) if col == 0 else (self.cols - half_c, self.cols - w)
            rs = (0, half_r - h) if row == 0 else (self.rows - half_r, self.rows - h)
        for _ in range(200):
            c, r = self.rng.randint(*cs), self.rng.randint(*rs)
            block = {(c + i, r + j) for i in range(w) for j in range(h)}
            if not block & self.taken:
                self.taken |= block
                return c, r
        return None

    def shape(self, kind: str, colour: str, quarter: str | None = None) -> Shape | None:
        span = self.rng.choice((1, 2))
        cell = self.place(span, span, quarter)
        return None if cell is None else Shape(kind, colour, cell, span)


def make_scene(rng: random.Random, category: str) -> Scene:
    """A scene in which a question of `category` (open or multiple-choice) has an answer."""
    while True:
        scene = _try_scene(rng, category)
        if scene is not None:
            return scene


def _try_scene(rng: random.Random, category: str) -> Scene | None:
    size = rng.choice(SIZES)
    scene = Scene(size, tuple(rng.randint(225, 255) for _ in range(3)))
    placer = _Placer(rng, size)
    if category == "text" or rng.random() < 0.3:
        scene.text = _random_text(rng)
        scene.text_cell = placer.place(TEXT_LENGTH, 1)
        if scene.text_cell is None:
            return None
    wanted: list[tuple[str, str, str | None]] = []  # (kind, colour, quarter)
    if category == "count":
        kind = rng.choice(KINDS)
        wanted += [(kind, rng.choice(list(COLOURS)), None) for _ in range(rng.randint(1, MAX_COUNT))]
        others = [k for k in KINDS if k != kind]
    elif category in ("colour", "grounding", "position"):
        kind, colour = rng.choice(KINDS), rng.choice(list(COLOURS))
        wanted.append((kind, colour, rng.choice(QUARTERS) if category == "position" else None))
        others = [k for k in KINDS if k != kind] if category == "colour" else list(KINDS)
    else:
        others = list(KINDS)
    for _ in range(rng.randint(0, 2 if category == "count" else 3)):
        wanted.append((rng.choice(others), rng.choice(list(COLOURS)), None))
    for kind, colour, quarter in wanted:
        shape = placer.shape(kind, colour, quarter)
        if shape is None:
            return None
        scene.shapes.append(shape)
    return scene


def _unique(scene: Scene, key) -> list[Shape]:
    values = [key(s) for s in scene.shapes]
    return [s for s in scene.shapes if values.count(key(s)) == 1]


def grounding_answer(shape: Shape) -> str:
    """Qwen2.5-VL's grounding format: absolute pixel coordinates of the image the model sees."""
    return json.dumps({"bbox_2d": list(shape.box), "label": shape.label})


def open_questions(scene: Scene) -> list[Question]:
    """Every open question the scene answers, by category."""
    out = [Question("colour", f"What colour is the {s.kind}?", s.colour, tuple(s.cells))
           for s in _unique(scene, lambda s: s.kind)]
    kinds = [s.kind for s in scene.shapes]  # counts are asked of the kinds in the picture: answers run 1 to MAX_COUNT
    out += [Question("count", f"How many {PLURALS[k]} are there?", str(kinds.count(k)),
                     tuple(c for s in scene.shapes if s.kind == k for c in s.cells)) for k in KINDS if k in kinds]
    if scene.text is not None:
        c, r = scene.text_cell
        out.append(Question("text", "What is written in the box?", scene.text, tuple((c + i, r) for i in range(TEXT_LENGTH))))
    out += [Question("grounding", f"Where is the {s.label}?", grounding_answer(s), (s.cell,))
            for s in _unique(scene, lambda s: s.label)]
    return out


def _choice(rng: random.Random, category: str, question: str, correct: str, pool: list[str], cells: Cells = ()) -> Choice:
    options = [correct] + rng.sample([p for p in pool if p != correct], 3)
    rng.shuffle(options)
    hint = HINTS[category] if rng.random() < 0.5 else None
    return Choice(category, question, hint, tuple(options), "ABCD"[options.index(correct)], cells)


def _text_distractors(rng: random.Random, text: str) -> list[str]:
    """Two near misses (one character changed) and two random strings of the same pattern, in the order drawn (a
    dict, not a set: a set of strings iterates in an order that changes with Python's hash seed)."""
    out = {}
    while len(out) < 2:
        i = rng.randrange(3)
        alphabet = LETTERS if text[i] in LETTERS else DIGITS
        out[text[:i] + rng.choice([a for a in alphabet if a not in text]) + text[i + 1:]] = None
    while len(out) < 4:
        out[_random_text(rng)] = None
    out.pop(text, None)
    return list(out)


def choice_questions(scene: Scene, rng: random.Random) -> list[Choice]:
    """Every multiple-choice question the scene answers, with options drawn from rng."""
    out = []
    for q in open_questions(scene):
        if q.category == "colour":
            out.append(_choice(rng, "colour", q.question, q.answer, list(COLOURS), q.cells))
        elif q.category == "count":
            out.append(_choice(rng, "count", q.question, q.answer, [str(n) for n in range(MAX_COUNT + 2)], q.cells))
        elif q.category == "text":
            out.append(_choice(rng, "text", q.question, q.answer, _text_distractors(rng, q.answer), q.cells))
    for s in _unique(scene, lambda s: s.label):
        if (quarter := _quarter(s.box, scene.size)) is not None:
            out.append(_choice(rng, "position", f"In which part of the image is the {s.label}?", quarter, list(QUARTERS),
                               tuple(s.cells)))
    return out


def counted(scene: Scene) -> str:
    """The question a scene made for counting is asked: about the kind make_scene put first, so that its counts run
    from 1 to MAX_COUNT evenly (of the other kinds in the picture, most counts are 1)."""
    return f"How many {PLURALS[scene.shapes[0].kind]} are there?"


def _row(rng: random.Random, category: str, ask):
    """A scene made for `category` and one of its questions of that category (for counting, `counted`)."""
    while True:
        scene = make_scene(rng, category)
        asked = [q for q in ask(scene) if q.category == category and (category != "count" or q.question == counted(scene))]
        if asked:
            return scene, rng.choice(asked)


def open_row(rng: random.Random, category: str) -> tuple[Scene, Question]:
    return _row(rng, category, open_questions)


def choice_row(rng: random.Random, category: str) -> tuple[Scene, Choice]:
    return _row(rng, category, lambda scene: choice_questions(scene, rng))


def write_tsvs(out_dir: Path, seed: int, rows: int) -> tuple[Path, Path]:
    """`rows` multiple-choice and `rows` open questions, categories in turn, in the VLMEvalKit MMBench TSV layout
    (the open file has no hint or option columns; its answer is the exact answer string)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    mcq, opened = out_dir / "mcq.tsv", out_dir / "open.tsv"
    with mcq.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"])
        for i in range(rows):
            scene, c = choice_row(rng, MCQ_CATEGORIES[i % len(MCQ_CATEGORIES)])
            w.writerow([i, c.question, c.hint or "", *c.options, c.answer, c.category, _b64(scene)])
    with opened.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["index", "question", "answer", "category", "image"])
        for i in range(rows):
            scene, q = open_row(rng, OPEN_CATEGORIES[i % len(OPEN_CATEGORIES)])
            w.writerow([i, q.question, q.answer, q.category, _b64(scene)])
    return mcq, opened


def _b64(scene: Scene) -> str:
    return base64.b64encode(scene.png()).decode()


def example_scene() -> Scene:
    """The bundled example image: one of each kind, in four colours and both sizes, and a text box."""
    scene = Scene((280, 224), (246, 244, 238))
    scene.shapes = [Shape("triangle", "red", (1, 1), 2), Shape("circle", "blue", (7, 1), 1),
                    Shape("square", "green", (1, 5), 1), Shape("star", "yellow", (7, 5), 2)]
    scene.text, scene.text_cell = "K7P", (4, 3)
    return scene


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    tsv = sub.add_parser("tsv", help="held-out question files")
    tsv.add_argument("--seed", type=int, required=True, help="one the training never saw (it draws from its --seed)")
    tsv.add_argument("--rows", type=int, default=400, help="questions per file")
    tsv.add_argument("--out", type=Path, required=True, help="directory for mcq.tsv and open.tsv")
    example = sub.add_parser("example", help="the bundled example image")
    example.add_argument("--out", type=Path, default=EXAMPLE_IMAGE)
    args = p.parse_args()
    if args.command == "tsv":
        for path in write_tsvs(args.out, args.seed, args.rows):
            print(path)
    else:
        example_scene().draw().save(args.out)
        for q in open_questions(example_scene()):
            print(f"{q.question} -> {q.answer}")


if __name__ == "__main__":
    main()
