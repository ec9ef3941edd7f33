"""Accuracy runs on VLMEvalKit-style TSV files through the running pipeline: multiple choice in the MMBench layout
(index, question, hint, A-D, answer, category, image as base64), prompted as VLMEvalKit prompts Qwen2-VL, scored by
the chosen letter; open questions scored by exact match, grounding answers by box IoU. Reports overall and
per-category accuracy and writes the predictions.

    python launch.py eval --data MMBench_DEV_EN.tsv --model DIR [--limit N] [--out preds.jsonl] [--mode mcq|open]
"""

import base64
import binascii
import csv
import json
import re
import string
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from common.messages import SamplingParams
from common.options import Options
from frontend.pipeline import Pipeline, answers
from frontend.prompt import Prompter, user_message

MCQ_INSTRUCTION = "Please select the correct answer from the options above."
IOU_THRESHOLD = 0.5
CIRCULAR = 1_000_000  # VLMEvalKit's circular MMBench rows: index + k * 1e6 is question `index` with options rotated


def mcq_prompt(question: str, hint: str | None, options: dict[str, str]) -> str:
    """VLMEvalKit's Qwen2-VL MCQ prompt (vlmeval/vlm/qwen2_vl/prompt.py, English): the image comes first, then this."""
    prompt = f"Hint: {hint}\n" if hint else ""
    prompt += f"Question: {question}\n"
    if options:
        prompt += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items()) + MCQ_INSTRUCTION
    return prompt.rstrip()


@dataclass
class Row:
    index: str
    question: str
    images: list[bytes]
    answer: str | None
    category: str
    hint: str | None = None
    options: dict[str, str] = field(default_factory=dict)


def _present(value: str | None) -> str | None:
    """pandas writes a missing cell as an empty field (and some files spell it nan)."""
    return None if value is None or value.strip() in ("", "nan", "NaN", "None") else value


def read_tsv(path) -> list[Row]:
    """Rows of a VLMEvalKit TSV. An image cell is base64 (or a JSON list of them for several images); a cell of 64
    characters or fewer names the row whose image it shares, as VLMEvalKit writes repeated images."""
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8") as f:
        records = list(csv.DictReader(f, delimiter="\t"))
    if not records:
        raise ValueError(f"{path}: no rows")
    missing = {"index", "question", "image"} - set(records[0])
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}; a VLMEvalKit TSV has index, question, "
                         "image (base64) and, to be scored, answer")
    cells = {r["index"]: r["image"] for r in records}
    rows = []
    for r in records:
        cell = cells[r["index"]]
        if len(cell) <= 64:
            if cell not in cells or len(cells[cell]) <= 64:
                raise ValueError(f"{path}: row {r['index']}: image cell {cell!r} names no row with an image")
            cell = cells[cell]
        encoded = json.loads(cell) if cell.startswith("[") else [cell]
        try:
            images = [base64.b64decode(e, validate=True) for e in encoded]
        except binascii.Error as e:
            raise ValueError(f"{path}: row {r['index']}: image is not valid base64 ({e})") from None
        options = {k: r[k] for k in string.ascii_uppercase if _present(r.get(k)) is not None}
        rows.append(Row(r["index"], r["question"], images, _present(r.get("answer")), r.get("category") or "",
                        _present(r.get("hint")), options))
    return rows


def extract_choice(text: str, options: dict[str, str]) -> str | None:
    """The option letter an answer names: one letter standing alone ("B", "B.", "(B)", "The answer is B") or,
    failing that, the text of exactly one option. None when neither settles it."""
    letters = {m.group(1) for m in re.finditer(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])", text) if m.group(1) in options}
    if len(letters) == 1:
        return letters.pop()
    lowered = text.lower()
    named = [k for k, v in options.items() if v.lower() in lowered]
    return named[0] if len(named) == 1 else None


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: what exact match compares."""
    return " ".join(text.lower().translate(str.maketrans("", "", string.punctuation)).split())


_BBOX = re.compile(r'"bbox_2d"\s*:\s*\[([^\]]*)\]')
_FOUR_NUMBERS = re.compile(r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]")


def parse_box(text: str) -> list[float] | None:
    """The first box in an answer: Qwen2.5-VL's {"bbox_2d": [x1, y1, x2, y2], ...} or a bare list of four numbers."""
    m = _BBOX.search(text)
    if m is not None:
        numbers = re.findall(r"-?\d+(?:\.\d+)?", m.group(1))
        if len(numbers) == 4:
            return [float(n) for n in numbers]
    m = _FOUR_NUMBERS.search(text)
    return [float(n) for n in m.groups()] if m else None


def iou(a: list[float], b: list[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])
    union = area(a) + area(b) - w * h
    return w * h / union if union > 0 else 0.0


def score(row: Row, prediction: str, mode: str) -> dict:
    """What the prediction answers and whether that is right: mcq by letter, open by box IoU when the reference is
    a box, else by exact match after normalise()."""
    if mode == "mcq":
        choice = extract_choice(prediction, row.options)
        return {"extracted": choice, "correct": row.answer is not None and choice == row.answer.strip()}
    reference = parse_box(row.answer) if row.answer is not None else None
    if reference is not None:
        box = parse_box(prediction)
        overlap = iou(box, reference) if box is not None else 0.0
        return {"extracted": box, "iou": overlap, "correct": overlap >= IOU_THRESHOLD}
    return {"extracted": normalise(prediction), "correct": row.answer is not None and normalise(prediction) == normalise(row.answer)}


def requests(prompter: Prompter, rows: list[Row], mode: str, max_new_tokens: int):
    """Each row as a greedy request (its id: the row's position), built as it is needed."""
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    for i, row in enumerate(rows):
        prompt = mcq_prompt(row.question, row.hint, row.options) if mode == "mcq" else row.question
        yield prompter.request(user_message(prompt, row.images), sampling, request_id=str(i))


class Progress:
    """A one-line progress bar on stderr with the running accuracy."""

    def __init__(self, total: int, out=sys.stderr):
        self.total, self.out, self.start, self.shown = total, out, time.monotonic(), 0.0

    def update(self, done: int, right: int) -> None:
        now = time.monotonic()
        if done < self.total and now - self.shown < 0.5:
            return
        self.shown = now
        filled = round(30 * done / self.total)
        rate = done / max(now - self.start, 1e-9)
        self.out.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} "
                       f"accuracy {100 * right / max(done, 1):.1f}% {rate:.1f} q/s")
        if done == self.total:
            self.out.write("\n")
        self.out.flush()


def summarise(rows: list[Row], results: list[dict], mode: str) -> dict:
    by_category = defaultdict(list)
    for row, r in zip(rows, results):
        by_category[row.category].append(r["correct"])
    summary = {
        "questions": len(rows), "mode": mode, "answered": sum(row.answer is not None for row in rows),
        "accuracy": sum(r["correct"] for r in results) / len(results),
        "categories": {c: {"accuracy": sum(v) / len(v), "questions": len(v)} for c, v in sorted(by_category.items())},
        "errors": sum(r["error"] is not None for r in results),
    }
    if mode == "mcq":
        summary["no_choice"] = sum(r["extracted"] is None for r in results)
        groups = defaultdict(list)
        for row, r in zip(rows, results):
            groups[int(float(row.index)) % CIRCULAR].append(r["correct"])
        if any(len(g) > 1 for g in groups.values()):  # every rotation of a question must be right
            summary["circular_accuracy"] = sum(all(g) for g in groups.values()) / len(groups)
    ious = [r["iou"] for r in results if "iou" in r]
    if ious:
        summary["grounding"] = {"questions": len(ious), "mean_iou": sum(ious) / len(ious),
                                f"accuracy_at_iou_{IOU_THRESHOLD}": sum(i >= IOU_THRESHOLD for i in ious) / len(ious)}
    return summary


def print_summary(summary: dict, data: str, out=sys.stdout) -> None:
    if not summary["answered"]:
        print(f"{data}: {summary['questions']} questions ({summary['mode']}), no answer column: predictions only",
              file=out)
        return
    print(f"{data}: {summary['questions']} questions ({summary['mode']}), accuracy {100 * summary['accuracy']:.1f}%",
          file=out)
    for category, c in summary["categories"].items():
        print(f"  {category or '(no category)':<24} {100 * c['accuracy']:6.1f}%  of {c['questions']}", file=out)
    if "circular_accuracy" in summary:
        print(f"  circular accuracy (all rotations right): {100 * summary['circular_accuracy']:.1f}%", file=out)
    if "grounding" in summary:
        g = summary["grounding"]
        print(f"  grounding: mean IoU {g['mean_iou']:.3f}, IoU >= {IOU_THRESHOLD}: "
              f"{100 * g[f'accuracy_at_iou_{IOU_THRESHOLD}']:.1f}% of {g['questions']}", file=out)
    if summary.get("no_choice"):
        print(f"  {summary['no_choice']} answers named no option", file=out)
    if summary["errors"]:
        print(f"  {summary['errors']} requests failed (see the predictions file)", file=out)


def write_predictions(path: Path, rows: list[Row], results: list[dict]) -> None:
    records = []
    for row, r in zip(rows, results):
        record = {"index": row.index, "category": row.category, "question": row.question, "hint": row.hint,
                  **row.options, "answer": row.answer, **r}
        records.append(record)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(rec) + "\n" for rec in records))
        return
    columns = list(dict.fromkeys(k for rec in records for k in rec))
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(columns)
        for rec in records:
            w.writerow(["" if rec.get(k) is None else json.dumps(rec[k]) if isinstance(rec[k], list) else rec[k]
                        for k in columns])


def add_arguments(p) -> None:
    p.add_argument("--data", required=True, help="VLMEvalKit TSV (MMBench layout), images as base64")
    p.add_argument("--mode", choices=["mcq", "open"], help="default: mcq when the file has option columns A, B, ...")
    p.add_argument("--limit", type=int, help="only the first N rows")
    p.add_argument("--out", type=Path, help="predictions file: .jsonl, or .tsv for anything else")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--in-flight", type=int, default=4, help="requests queued in the pipeline at once")
    p.add_argument("--json", action="store_true", help="last line of stdout: the summary as one JSON object")


def run(args) -> int:
    if args.out is not None and args.out.suffix not in (".jsonl", ".tsv"):
        raise ValueError(f"--out {args.out}: use a .jsonl or .tsv file name")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    if not Path(args.data).is_file():
        raise FileNotFoundError(f"--data {args.data} not found")
    rows = read_tsv(args.data)[: args.limit]
    mode = args.mode or ("mcq" if rows[0].options else "open")
    if mode == "mcq" and not all(row.options for row in rows):
        raise ValueError(f"{args.data}: --mode mcq needs option columns (A, B, ...) in every row")
    options = Options.from_args(args)
    options.check()
    results: list[dict | None] = [None] * len(rows)
    pipeline = Pipeline(options)
    try:
        pipeline.start()
        pipeline.wait_ready()
        prompter = Prompter(options.model, pipeline.context_len)
        progress, right = Progress(len(rows)), 0
        queued = requests(prompter, rows, mode, args.max_new_tokens)
        for done, (request, answer) in enumerate(answers(pipeline, queued, args.in_flight), 1):
            i, text = int(request.id), answer["text"]
            results[i] = {"prediction": text, **score(rows[i], text, mode), "error": answer.get("error")}
            right += results[i]["correct"]
            progress.update(done, right)
    finally:
        pipeline.close()
    summary = summarise(rows, results, mode)
    if args.out is not None:
        write_predictions(args.out, rows, results)
    print_summary(summary, args.data)
    if args.json:
        print(json.dumps(summary))
    return 0
