"""The pieces of `launch.py eval` that need no model: VLMEvalKit's prompt, letter extraction, free-answer and box
scoring, TSV reading, the summary."""

import base64
import csv
import io
import json

import pytest
from PIL import Image

from frontend.eval import Row, extract_choice, iou, mcq_prompt, normalise, parse_box, read_tsv, score, summarise

OPTIONS = {"A": "blue", "B": "red", "C": "green", "D": "purple"}


def test_mcq_prompt_is_vlmevalkits_qwen2_vl_prompt():
    # vlmeval/vlm/qwen2_vl/prompt.py, _build_mcq_prompt, for an English question with a hint
    expected = ("Hint: Look closely.\nQuestion: What colour is the star?\nOptions:\nA. blue\nB. red\nC. green\n"
                "D. purple\nPlease select the correct answer from the options above.")
    assert mcq_prompt("What colour is the star?", "Look closely.", OPTIONS) == expected


def test_mcq_prompt_without_a_hint_starts_with_the_question():
    assert mcq_prompt("How many?", None, {"A": "1", "B": "2"}) == (
        "Question: How many?\nOptions:\nA. 1\nB. 2\nPlease select the correct answer from the options above.")


@pytest.mark.parametrize("answer, letter", [
    ("B", "B"), ("B.", "B"), ("(C)", "C"), ("D. purple", "D"), ("The answer is B", "B"), ("Answer: C", "C"),
    ("purple", "D"), ("It is red.", "B"), ("I pick (B) red", "B"),
])
def test_the_chosen_letter_is_found(answer, letter):
    assert extract_choice(answer, OPTIONS) == letter


@pytest.mark.parametrize("answer", ["A or B", "E", "no idea", "red or blue", ""])
def test_an_answer_naming_no_single_option_has_no_letter(answer):
    assert extract_choice(answer, OPTIONS) is None


def test_exact_match_ignores_case_whitespace_and_punctuation():
    assert normalise("  Red. ") == normalise("red") == "red"
    assert normalise("K7P") != normalise("K7R")


@pytest.mark.parametrize("text", [
    '{"bbox_2d": [10, 20, 110, 70], "label": "red square"}',
    '```json\n[\n\t{"bbox_2d": [10, 20, 110, 70], "label": "red square"}\n]\n```',
    "The box is [10, 20, 110, 70].",
])
def test_a_box_is_parsed_from_qwen_json_or_a_bare_list(text):
    assert parse_box(text) == [10, 20, 110, 70]


def test_no_box_in_free_text():
    assert parse_box("somewhere on the left") is None


def test_iou_by_hand():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)  # overlap 5x10, union 100+100-50


def _row(answer, options=None, category="c", index="0"):
    return Row(index, "q", [], answer, category, None, options or {})


def test_a_grounding_answer_is_right_at_iou_half_or_more():
    reference = '{"bbox_2d": [0, 0, 100, 100], "label": "red square"}'
    near = score(_row(reference), '{"bbox_2d": [0, 0, 100, 60], "label": "red square"}', "open")
    far = score(_row(reference), '{"bbox_2d": [0, 0, 100, 40], "label": "red square"}', "open")
    assert (near["iou"], near["correct"]) == (pytest.approx(0.6), True)
    assert (far["iou"], far["correct"]) == (pytest.approx(0.4), False)
    assert score(_row(reference), "no box", "open") == {"extracted": None, "iou": 0.0, "correct": False}


def test_a_multiple_choice_answer_is_right_when_its_letter_is():
    assert score(_row("B", OPTIONS), "B", "mcq") == {"extracted": "B", "correct": True}
    assert score(_row("B", OPTIONS), "blue", "mcq") == {"extracted": "A", "correct": False}


def _png(colour) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (30, 20), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_tsv_rows_read_as_vlmevalkit_writes_them(tmp_path):
    # as pandas writes MMBench: a missing hint or option is an empty cell, a repeated image names the row holding it,
    # a cell with quotes is quoted
    path = tmp_path / "mmbench.tsv"
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"])
        w.writerow([7, 'Which "word"?', "", "yes", "no", "", "", "A", "reasoning", _png("red")])
        w.writerow([1000007, 'Which "word"?', "A hint.", "no", "yes", "", "", "B", "reasoning", "7"])
    first, second = read_tsv(path)
    assert (first.index, first.question, first.hint, first.options, first.answer) == (
        "7", 'Which "word"?', None, {"A": "yes", "B": "no"}, "A")
    assert second.hint == "A hint." and second.images == first.images
    assert Image.open(io.BytesIO(first.images[0])).size == (30, 20)


def test_a_tsv_without_an_image_column_is_refused(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("index\tquestion\tanswer\n0\tq\ta\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['image'\]"):
        read_tsv(path)


def test_an_image_reference_to_no_row_is_refused(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text(f"index\tquestion\tanswer\timage\n0\tq\ta\t{_png('red')}\n1\tq\ta\t5\n")
    with pytest.raises(ValueError, match="row 1: image cell '5' names no row with an image"):
        read_tsv(path)


def test_summary_reports_per_category_and_circular_accuracy():
    rows = [_row("A", OPTIONS, "colour", "3"), _row("A", OPTIONS, "colour", "1000003"), _row("A", OPTIONS, "count", "4")]
    results = [{"correct": True, "extracted": "A", "error": None}, {"correct": False, "extracted": None, "error": None},
               {"correct": True, "extracted": "A", "error": None}]
    summary = summarise(rows, results, "mcq")
    assert summary["accuracy"] == pytest.approx(2 / 3)
    assert summary["categories"] == {"colour": {"accuracy": 0.5, "questions": 2}, "count": {"accuracy": 1.0, "questions": 1}}
    assert summary["circular_accuracy"] == 0.5  # question 3 failed one rotation; question 4 had one
    assert summary["no_choice"] == 1
    json.dumps(summary)
