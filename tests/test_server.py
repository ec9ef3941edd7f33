"""`launch.py serve` driven with the official openai client: answers equal the one-shot `launch.py --json` answers,
streamed or not; stop strings, usage counts; errors in OpenAI's shape (400 bad input, 503 worker down); concurrent
requests get the answers they get alone."""

import base64
import io
import json
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import psutil
import pytest
from PIL import Image

from common.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny"  # --served-model-name
RNG = np.random.default_rng(1)
PNG = {}
for name, (h, w) in {"small": (64, 64), "tall": (300, 200), "wide": (90, 260)}.items():
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    PNG[name] = buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def image_part(png: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_uri(png)}}


def start_server(model: Path, *extra: str):
    """`launch.py serve` on a free port, float32, with `extra` flags; → (process, base URL) once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "launch.py", "serve", "--model", str(model), "--served-model-name", MODEL, "--dtype", "float32",
         "--port", str(port), "--max-batch", "4", "--chunk-width", "24",
         "--allowed-local-media-path", tempfile.gettempdir(), *extra], cwd=ROOT)  # the tests' video frame folders
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, "the server exited while starting"
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not come up in 120 s"
        time.sleep(0.3)


def stop_server(proc) -> None:
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tiny_model):
    proc, url = start_server(tiny_model)
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def ask(client, content, max_tokens=8, **kwargs):
    messages = content if isinstance(content, list) and content and "role" in content[0] else \
        [{"role": "user", "content": content}]
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0,
                                          **kwargs)


def one_shot(model: Path, tmp_path: Path, prompt: str, images=(), video=None, max_tokens=8) -> dict:
    args = []
    for i, png in enumerate(images):
        (tmp_path / f"{i}.png").write_bytes(png)
        args += ["--image", str(tmp_path / f"{i}.png")]
    if video is not None:
        args += ["--video", str(video), "--fps", "2"]
    out = subprocess.run([sys.executable, "launch.py", "--model", str(model), "--dtype", "float32", *args,
                          "--prompt", prompt, "--max-new-tokens", str(max_tokens), "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("frames")
    for i in range(4):
        Image.fromarray(RNG.integers(0, 256, (84, 112, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def test_health_and_models(server, client):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4o' is not served here"):
        client.models.retrieve("gpt-4o")


@pytest.mark.parametrize("field, value", [("store", True), ("functions", [{"name": "f"}]), ("prediction", {}),
                         ("frobnicate", 1)])
def test_a_field_the_server_does_not_honour_is_a_400_naming_it(client, field, value):
    with pytest.raises(openai.BadRequestError, match=f"`{field}` is not supported by this server") as e:
        ask(client, "Hi", extra_body={field: value})
    assert e.value.body["param"] == field and e.value.body["code"] == "unsupported_parameter"


def test_tokenize_and_detokenize_agree_with_the_prompt_the_server_builds(server, client, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    plain = httpx.post(f"{server}/tokenize", json={"model": MODEL, "prompt": "Hello world"}).json()
    assert plain["tokens"] == tok("Hello world")["input_ids"] and plain["count"] == len(plain["tokens"])
    messages = [{"role": "user", "content": "Hi there"}]
    chat = httpx.post(f"{server}/tokenize", json={"model": MODEL, "messages": messages}).json()
    assert chat["tokens"] == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"]
    assert chat["count"] == ask(client, "Hi there").usage.prompt_tokens and chat["max_model_len"] == 4096
    back = httpx.post(f"{server}/detokenize", json={"model": MODEL, "tokens": chat["tokens"]}).json()
    assert back["prompt"] == tok.decode(chat["tokens"])


@pytest.mark.parametrize("path, body, message", [
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "either prompt or messages"),
    ("/tokenize", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "text only"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": True}, "Extra inputs are not permitted"),
    ("/detokenize", {"tokens": [10**9]}, "past this model's vocabulary"),
    ("/detokenize", {"tokens": [1], "model": "gpt-4o"}, "not served here"),
], ids=["both", "an image", "an unknown field", "a token past the vocabulary", "another model"])
def test_tokenize_and_detokenize_refuse_what_they_cannot_do(server, path, body, message):
    response = httpx.post(f"{server}{path}", json={"model": MODEL, **body})
    assert response.status_code == 400 and message in response.json()["error"]["message"], response.text


def test_fields_at_the_values_that_ask_for_nothing_are_taken(client):
    plain = ask(client, "Hi").choices[0].message.content
    same = ask(client, "Hi", frequency_penalty=0, presence_penalty=0, logprobs=False, user="me",
               response_format={"type": "text"}).choices[0].message.content
    assert same == plain


@pytest.mark.parametrize("case", ["one image as a data URI", "two images", "video frames"])
def test_answer_equals_the_one_shot_answer(client, tiny_model, frames_dir, tmp_path, case):
    images = {"one image as a data URI": [PNG["tall"]], "two images": [PNG["small"], PNG["wide"]]}.get(case, [])
    video = frames_dir if case == "video frames" else None
    expected = one_shot(tiny_model, tmp_path, "Describe it.", images, video)
    content = [image_part(png) for png in images]
    if video is not None:
        content.append({"type": "video_url", "video_url": {"url": str(video), "fps": 2}})
    answer = ask(client, content + [{"type": "text", "text": "Describe it."}])
    assert answer.choices[0].message.content == expected["text"]
    assert answer.choices[0].finish_reason == expected["finish_reason"]
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == \
        (expected["prompt_tokens"], len(expected["token_ids"]))


def test_streamed_answer_equals_the_whole_answer(client):
    content = [image_part(PNG["small"]), {"type": "text", "text": "What is it?"}]
    whole = ask(client, content, max_tokens=12)
    chunks = list(ask(client, content, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_a_stream_has_one_chunk_per_generated_token_empty_text_included(client):
    # a 64-character stop string holds back the last 63 characters: the first tokens have no text to send yet
    chunks = list(ask(client, "Go on.", max_tokens=24, stream=True, stream_options={"include_usage": True},
                      stop=["@" * 64], extra_body={"ignore_eos": True}))
    tokens = [c for c in chunks[1:] if c.choices and c.choices[0].finish_reason is None]  # after the role chunk
    assert len(tokens) == chunks[-1].usage.completion_tokens == 24
    assert tokens[0].choices[0].delta.content == ""


def test_usage_counts_the_chat_template_tokens_of_every_message(client, tiny_model):
    messages = [{"role": "system", "content": "You answer in haiku."}, {"role": "user", "content": "Hi."},
                {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "Tell me more."}]
    tok = Tokenizer.from_dir(tiny_model)
    answer = ask(client, messages, max_tokens=5, extra_body={"ignore_eos": True})
    assert answer.usage.prompt_tokens == len(tok.encode(tok.apply_chat_template(messages)))
    assert answer.usage.completion_tokens == 5 and answer.choices[0].finish_reason == "length"
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 5


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_stop_string_cuts_the_answer_before_it(client, stream):
    content = [image_part(PNG["wide"]), {"type": "text", "text": "Go on."}]
    full = ask(client, content, max_tokens=24, extra_body={"ignore_eos": True}).choices[0].message.content
    stop = full[len(full) // 2:][:3]  # from the middle of the answer, likely across tokens
    expected = full[: full.index(stop)]
    kwargs = dict(max_tokens=24, stop=[stop, "\x00never"], extra_body={"ignore_eos": True})
    if stream:
        chunks = [c for c in ask(client, content, stream=True, **kwargs) if c.choices]
        text, finish = "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        answer = ask(client, content, **kwargs)
        text, finish = answer.choices[0].message.content, answer.choices[0].finish_reason
    assert (text, finish) == (expected, "stop")


@pytest.mark.parametrize("content, kwargs, message", [
    ([image_part(b"not a png at all")], {}, "image 1: cannot decode"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}], {}, "image 1"),
    ("hello " * 5000, {}, "leaves no room in a context of 4096 tokens"),
    ("Hi", {"temperature": 5}, "temperature"),
    ("Hi", {"top_p": 0}, "top_p"),
    ("Hi", {"model": "gpt-4o"}, "model 'gpt-4o' is not served here"),
], ids=["unreadable image", "bad data URI", "prompt past the context", "bad temperature", "bad top_p", "unknown model"])
def test_bad_input_is_a_400_in_openai_shape(client, server, content, kwargs, message):
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError, match=message):
        client.chat.completions.create(**body)
    raw = httpx.post(f"{server}/v1/chat/completions", json={**body, "stream": True}, timeout=60)
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}


def test_concurrent_requests_get_the_answers_they_get_alone(client):
    cases = [[{"type": "text", "text": "Count to ten."}], [image_part(PNG["small"]), {"type": "text", "text": "Hm?"}],
             [image_part(PNG["tall"]), {"type": "text", "text": "Why?"}], [{"type": "text", "text": "Tell a story."}],
             [image_part(PNG["wide"]), image_part(PNG["small"]), {"type": "text", "text": "Compare."}]]

    def answer(content):
        return ask(client, content, max_tokens=32, extra_body={"ignore_eos": True}).choices[0].message.content

    def bad():  # one bad request among them disturbs none
        with pytest.raises(openai.BadRequestError):
            ask(client, [image_part(b"broken")])

    alone = [answer(c) for c in cases]
    with ThreadPoolExecutor(len(cases) + 1) as pool:
        together = [pool.submit(answer, c) for c in cases]
        pool.submit(bad).result()
        assert [f.result() for f in together] == alone


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "whole"])
def test_clients_that_go_away_free_their_rows(client, streamed):
    # The server decodes 4 requests at once (--max-batch 4). Four clients ask for everything up to the end of the
    # context (about 4000 tokens: several seconds each) and leave early.
    def leave(_):
        kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=0,
                      extra_body={"ignore_eos": True})
        if streamed:
            stream = client.chat.completions.create(stream=True, **kwargs)
            next(stream), next(stream)
            stream.close()
        else:
            with pytest.raises(openai.APITimeoutError):
                client.with_options(timeout=1.0).chat.completions.create(**kwargs)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(leave, range(4)))
    start = time.monotonic()
    ask(client, "Hi", max_tokens=4)
    assert time.monotonic() - start < 5  # a row is free at once, not after one of the abandoned answers


def test_a_dead_worker_is_a_503(tiny_model):
    proc, url = start_server(tiny_model)
    try:
        llm = next(p for p in psutil.Process(proc.pid).children() if "llm_worker" in p.cmdline())
        llm.kill()
        llm.wait(10)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.APIStatusError, match="the llm-0 worker died") as e:
            ask(client, "Hi")
        assert e.value.status_code == 503
        assert httpx.get(f"{url}/health").status_code == 503
    finally:
        stop_server(proc)
