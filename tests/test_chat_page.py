"""The web chat page (GET /, frontend/static/chat.html) in a real headless Chromium, Debian's, against `launch.py serve`
with the embedded demo model: a pasted image waits for the next message; a grounding answer about an uploaded image
streams in and its box is drawn where the answer puts it, scaled from the image the model saw (smart_resize) to the
image shown; the page's smart_resize is visual_worker's; pixel limits set on the page go with the request, and its box
follows them; a second turn sends the first with it and the page's sampling settings (no pixel limits unless set)."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import sync_playwright

from examples.demo.tasks import EXAMPLE_IMAGE, example_scene, open_questions
from tests.test_server import MODEL, ROOT, data_uri, start_server, stop_server
from visual_worker.preprocess import PreprocessConfig, smart_resize

CHROMIUM = Path("/usr/bin/chromium")  # Debian's (.ci/run installs it); Playwright's own browser downloads are not used
DEMO_MODEL = ROOT / "examples" / "model"
CONFIG = PreprocessConfig.from_dir(DEMO_MODEL)
ANSWERS = {q.question: q.answer for q in open_questions(example_scene()) if q.category == "grounding"}


def is_box_colour(rgb: np.ndarray) -> np.ndarray:
    """The page's first box colour, #ff00ff: nowhere in the demo image, nor in the labels (white on black)."""
    return (rgb[..., 0] > 200) & (rgb[..., 1] < 80) & (rgb[..., 2] > 200)


@pytest.fixture(scope="module")
def server():
    proc, url = start_server(DEMO_MODEL)
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM.is_file(), f"these tests drive Debian's chromium at {CHROMIUM}: apt-get install chromium " \
                               "(.ci/run does)"
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM))
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
    page.goto(f"{server}/")
    yield page
    page.close()


def ask(page, question: str, images=(), **settings: str) -> dict:
    """Uploads `images`, fills in the settings (temperature 0 unless given), asks `question` and waits for the whole
    streamed answer; → the request body."""
    if images:
        page.set_input_files("#files", [str(p) for p in images])
        page.wait_for_function(f"document.querySelectorAll('#pending img').length === {len(images)}")
    if not page.is_visible("#temperature"):
        page.click("#settings summary")
    for name, value in {"temperature": "0", **settings}.items():
        page.fill(f"#{name}", value)
    page.fill("#prompt", question)
    with page.expect_request("**/v1/chat/completions") as request:
        page.click("#send")
    page.wait_for_selector("#send:not([hidden])", timeout=120_000)  # Send is back: the stream has ended
    return json.loads(request.value.post_data)


def last_answer(page) -> str:
    return page.locator(".assistant .text").last.inner_text()


def drawn_box(page) -> tuple[np.ndarray, tuple[int, int]]:
    """The last answer's figure as shown (image and canvas) → (its RGB pixels, (shown width, height))."""
    figure = page.locator(".assistant").last.locator(".figure")
    figure.locator("canvas").wait_for()
    page.wait_for_function("document.querySelector('.assistant:last-child .figure canvas').width > 0")
    figure.scroll_into_view_if_needed()
    box = figure.bounding_box()  # its top may fall between pixels (text lines above it): the image is snapped to one
    clip = {"x": round(box["x"]), "y": round(box["y"]), "width": box["width"], "height": box["height"]}
    shot = Image.open(io.BytesIO(page.screenshot(clip=clip))).convert("RGB")
    shown = figure.locator("img").evaluate("img => [img.clientWidth, img.clientHeight]")
    assert shot.size == tuple(shown)
    return np.asarray(shot), tuple(shown)


def assert_box_outline(rgb: np.ndarray, rect: tuple[float, float, float, float], slack: int = 2) -> None:
    """The box colour lies along all four edges of rect (x1, y1, x2, y2 in shown pixels), and nowhere else."""
    mask = is_box_colour(rgb)
    ys, xs = np.nonzero(mask)
    assert len(xs), "no box was drawn"
    x1, y1, x2, y2 = rect

    def near(v, edge):
        return abs(v - edge) <= slack

    def between(v, lo, hi):
        return (v >= lo - slack) & (v <= hi + slack)

    def band(edge):
        return slice(round(edge) - slack, round(edge) + slack + 1)

    on_outline = ((near(xs, x1) | near(xs, x2)) & between(ys, y1, y2)) | \
                 ((near(ys, y1) | near(ys, y2)) & between(xs, x1, x2))
    off = list(zip(xs[~on_outline].tolist(), ys[~on_outline].tolist()))[:5]
    assert on_outline.all(), f"box colour off the outline of {rect}, e.g. at (x, y) {off}"
    rows, columns = range(round(y1), round(y2)), range(round(x1), round(x2))
    edges = {"left": [mask[y, band(x1)].any() for y in rows], "right": [mask[y, band(x2)].any() for y in rows],
             "top": [mask[band(y1), x].any() for x in columns], "bottom": [mask[band(y2), x].any() for x in columns]}
    for edge, drawn in edges.items():
        assert np.mean(drawn) > 0.9, f"the {edge} edge of {rect} is not drawn"


def test_the_page_carries_the_model_name_and_its_resize_rule(page):
    assert page.evaluate("SERVER") == {"model": MODEL, "factor": 28, "min_pixels": CONFIG.min_pixels,
                                       "max_pixels": CONFIG.max_pixels}


def test_the_page_carries_the_servers_pixel_limits_when_it_has_them(browser):
    proc, url = start_server(DEMO_MODEL, "--min-pixels", "3136", "--max-pixels", "62720")
    try:
        page = browser.new_page()
        page.goto(f"{url}/")
        assert page.evaluate("SERVER") == {"model": MODEL, "factor": 28, "min_pixels": 3136, "max_pixels": 62720}
        page.close()
    finally:
        stop_server(proc)


def test_the_page_resizes_as_the_visual_worker_does(page):
    rng = np.random.default_rng(0)
    sizes = [(224, 280), (448, 560), (70, 70), (42, 98), (1000, 30), (5000, 4000), (10, 10), (2, 300)]
    sizes += [tuple(int(v) for v in rng.integers(1, 3000, 2)) for _ in range(200)]
    sizes = [(h, w) for h, w in sizes if max(h, w) / min(h, w) <= 200]
    for lo, hi in [(CONFIG.min_pixels, CONFIG.max_pixels), (56 * 56, 28 * 28 * 1280)]:
        got = page.evaluate("([sizes, lo, hi]) => sizes.map(([h, w]) => smartResize(h, w, 28, lo, hi))",
                            [sizes, lo, hi])
        assert [tuple(s) for s in got] == [smart_resize(h, w, 28, lo, hi) for h, w in sizes]


def test_a_pasted_image_waits_for_the_next_message_until_clicked_away(page):
    png = data_uri(EXAMPLE_IMAGE.read_bytes())
    page.evaluate("""async png => {
        const clipboard = new DataTransfer();
        clipboard.items.add(new File([await (await fetch(png)).blob()], "shapes.png", {type: "image/png"}));
        document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: clipboard}));
    }""", png)
    page.wait_for_function("document.querySelectorAll('#pending img').length === 1")
    assert page.get_attribute("#pending img", "src") == png
    page.click("#pending img")
    assert page.locator("#pending img").count() == 0


def test_a_grounding_answer_streams_in_and_its_box_is_drawn_on_the_image(page):
    assert EXAMPLE_IMAGE.is_file(), "python -m examples.demo.tasks example writes it"
    ask(page, "Where is the red triangle?", [EXAMPLE_IMAGE])
    answer = last_answer(page)
    assert answer == ANSWERS["Where is the red triangle?"]  # {"bbox_2d": [31, 31, 80, 80], "label": "red triangle"}
    rgb, (w, h) = drawn_box(page)
    assert (w, h) == (280, 224)  # shown at its size, which smart_resize keeps: the box goes where the answer says
    assert_box_outline(rgb, tuple(json.loads(answer)["bbox_2d"]))


def test_the_box_is_scaled_from_the_resized_image_to_the_shown_image(page, tmp_path):
    """At twice the example's size the model sees 308x224 (max_pixels) and the page shows it at 480x384 (its CSS
    bound): a box at x in the model's image is drawn at x * 480 / 308."""
    image = tmp_path / "shapes-2x.png"
    Image.open(EXAMPLE_IMAGE).resize((560, 448), Image.NEAREST).save(image)
    resized_h, resized_w = smart_resize(448, 560, 28, CONFIG.min_pixels, CONFIG.max_pixels)
    assert (resized_w, resized_h) == (308, 224)
    ask(page, "Where is the red triangle?", [image])
    x1, y1, x2, y2 = json.loads(last_answer(page))["bbox_2d"]
    rgb, (w, h) = drawn_box(page)
    assert (w, h) == (480, 384)
    sx, sy = w / resized_w, h / resized_h
    assert_box_outline(rgb, (x1 * sx, y1 * sy, x2 * sx, y2 * sy))
    for wrong in [(w / 560, h / 448),  # as if the model had seen the image at its own size
                  (560 / resized_w, 448 / resized_h)]:  # as if the image were shown at its own size
        with pytest.raises(AssertionError):
            assert_box_outline(rgb, (x1 * wrong[0], y1 * wrong[1], x2 * wrong[0], y2 * wrong[1]))


def test_pixel_limits_go_with_the_request_and_the_box_follows_them(page, tmp_path):
    """max_pixels at the example's own area: the model sees the twice-size image at 280x224 again, answers as it does
    about the example, and the box is drawn at x * 480 / 280."""
    image = tmp_path / "shapes-2x.png"
    Image.open(EXAMPLE_IMAGE).resize((560, 448), Image.NEAREST).save(image)
    assert smart_resize(448, 560, 28, CONFIG.min_pixels, 280 * 224) == (224, 280)
    body = ask(page, "Where is the red triangle?", [image], max_pixels=str(280 * 224))
    assert body["mm_processor_kwargs"] == {"max_pixels": 280 * 224}
    answer = last_answer(page)
    assert answer == ANSWERS["Where is the red triangle?"]
    x1, y1, x2, y2 = json.loads(answer)["bbox_2d"]
    rgb, (w, h) = drawn_box(page)
    assert (w, h) == (480, 384)
    assert_box_outline(rgb, (x1 * w / 280, y1 * h / 224, x2 * w / 280, y2 * h / 224))


def test_a_second_turn_sends_the_first_with_it_and_the_settings(page):
    first = ask(page, "Where is the red triangle?", [EXAMPLE_IMAGE])
    answer = last_answer(page)
    # the demo model was taught single turns: the second answer is not checked
    second = ask(page, "Where is the blue circle?", top_p="0.9", max_tokens="5", seed="7")
    image = first["messages"][0]["content"][0]
    assert image["type"] == "image_url" and image["image_url"]["url"].startswith("data:image/png;base64,")
    assert second["messages"] == [first["messages"][0], {"role": "assistant", "content": answer},
                                  {"role": "user", "content": [{"type": "text", "text": "Where is the blue circle?"}]}]
    assert {k: v for k, v in second.items() if k != "messages"} == {
        "model": MODEL, "stream": True, "temperature": 0, "top_p": 0.9, "max_tokens": 5, "seed": 7}
    assert page.locator(".assistant").count() == 2 and not page.locator(".error").count()
