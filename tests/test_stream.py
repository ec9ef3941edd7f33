"""The LLM worker's text stream: decoding token by token gives the text of decoding all tokens at once, and a stop
string cuts the text before it, even when it spans tokens or is not yet complete."""

import pytest

from common.tokenizer import Tokenizer
from llm_worker.worker import Stream


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir)


def stream_out(tokenizer, ids, stop=()) -> tuple[list[str], bool]:
    """Feeds ids one at a time, the last one as done, as the worker does; → the deltas sent and whether a stop hit."""
    stream = Stream("r", 0, {}, tuple(stop))
    deltas = []
    for n in range(1, len(ids) + 1):
        delta, stopped = stream.advance(tokenizer, ids[:n], n == len(ids))
        deltas.append(delta)
        if stopped:
            return deltas, True
    return deltas, False


def test_token_by_token_text_equals_decoding_all_at_once(tokenizer):
    text = "Grüße, 世界! 🙂 done"
    ids = tokenizer.encode(text) + [151645]  # <|im_end|>: special, decodes to nothing
    assert len(ids) > len(text.split())  # the CJK and emoji characters span several byte-level tokens
    deltas, stopped = stream_out(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == text and not stopped
    assert not any("\ufffd" in d for d in deltas)  # a partial character waits for the rest of its bytes


def test_a_stop_string_across_tokens_cuts_the_text_before_it(tokenizer):
    ids = tokenizer.encode("Hello world. The end is near.")
    deltas, stopped = stream_out(tokenizer, ids, stop=["end is", "zzz"])
    assert stopped and "".join(deltas) == "Hello world. The "


def test_text_that_might_start_a_stop_string_waits_then_flows(tokenizer):
    ids = tokenizer.encode("one two three")
    deltas, stopped = stream_out(tokenizer, ids, stop=["three four"])
    assert not stopped and "".join(deltas) == "one two three"
    assert deltas[-1].endswith("three")  # held back until the last token showed "three four" would not come
