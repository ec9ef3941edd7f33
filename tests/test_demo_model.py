"""The shipped demo model (examples/model): it is a Hugging Face checkpoint that transformers loads unchanged and
that answers there exactly as our pipeline does; `python launch.py` with no arguments answers the question about
the bundled image correctly; `launch.py eval` scores a handful of held-out rows."""

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from examples.demo.tasks import choice_questions, example_scene, open_questions, write_tsvs
from frontend.eval import mcq_prompt
from tests.test_pipeline import reference_tokens, request, run_launch, running_pipeline

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "model"
IMAGE = ROOT / "examples" / "images" / "shapes.png"


def test_the_checkpoint_is_complete_and_under_40_mb():
    files = {p.name: p.stat().st_size for p in MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
            "generation_config.json"} <= set(files)
    assert sum(files.values()) < 40_000_000
    config = json.loads((MODEL / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == 151936 and config["tie_word_embeddings"]
    assert json.loads((MODEL / "generation_config.json").read_text())["eos_token_id"] == [151645, 151643]


def test_the_bundled_image_is_the_generators_example():
    assert (Image.open(IMAGE).convert("RGB").tobytes() == example_scene().draw().tobytes())


QUESTIONS = [q.question for q in open_questions(example_scene())]
CHOICES = [mcq_prompt(c.question, c.hint, dict(zip("ABCD", c.options)))
           for c in choice_questions(example_scene(), random.Random(0))[:4]]


@pytest.fixture(scope="module")
def reference():
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(MODEL, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def pipeline():
    """Both workers on the demo model, float32 as the reference runs."""
    yield from running_pipeline(MODEL, chunk_width=640)


@pytest.mark.parametrize("prompt", QUESTIONS + CHOICES)
def test_pipeline_answers_equal_transformers_on_the_bundled_image(pipeline, reference, prompt):
    case = dict(prompt=prompt, images=[IMAGE.read_bytes()], max_new_tokens=40)
    result = pipeline(request(**case))
    assert result["token_ids"] == reference_tokens(reference, MODEL, **case)
    assert result["finish_reason"] == "stop"


def test_launch_with_no_arguments_answers_the_default_question_correctly():
    from launch import DEFAULT_PROMPT

    expected = {q.question: q.answer for q in open_questions(example_scene())}[DEFAULT_PROMPT]
    out = run_launch("--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["text"] == expected


@pytest.mark.parametrize("kind", ["mcq", "open"])
def test_eval_scores_held_out_rows_and_writes_every_prediction(tmp_path, kind):
    """The accuracy run end to end on 8 held-out rows (categories in turn). The demo model reads the text box (see
    README, "Demo model": its held-out text accuracy); the other categories are scored, not asserted."""
    data = dict(zip(["mcq", "open"], write_tsvs(tmp_path, seed=424242, rows=8)))[kind]
    out = run_launch("eval", "--data", str(data), "--limit", "8", "--out", str(tmp_path / "predictions.jsonl"), "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["questions"] == 8 and summary["mode"] == kind
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [p["index"] for p in predictions] == [str(i) for i in range(8)]
    assert sum(p["correct"] for p in predictions) == round(8 * summary["accuracy"])
    if kind == "open":
        text = [p for p in predictions if p["category"] == "text"]
        assert len(text) == 2 and all(p["correct"] for p in text), text
