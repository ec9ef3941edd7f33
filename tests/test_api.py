"""frontend/api.py without a server: Qwen2.5's <tool_call> blocks parsed whole and as a stream (cut anywhere, the
stream gives what the whole parse gives), and the grammars that response_format and forced tool calls compile to."""

import functools
import json

import llguidance
import pytest

from common.tokenizer import Tokenizer
from common.options import DEFAULT_MODEL
from frontend.api import ChatRequest, ToolStream, grammar, parse_tool_calls

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TEXT = f"Let me look.\n{CALL}\n{CALL.replace('Paris', 'Oslo')}"


def test_whole_answers_split_into_content_and_calls():
    content, calls = parse_tool_calls(TEXT)
    assert content == "Let me look."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"})]
    assert len({c["id"] for c in calls}) == 2 and all(c["type"] == "function" for c in calls)
    assert parse_tool_calls(TEXT, parallel=False)[1][0]["function"]["arguments"] == '{"city": "Paris"}'
    assert parse_tool_calls(CALL)[0] is None
    broken = "<tool_call>\n{not json}\n</tool_call>"
    assert parse_tool_calls(broken) == (broken, [])  # not a call: it stays text
    assert parse_tool_calls("plain answer") == ("plain answer", [])


@pytest.mark.parametrize("step", [1, 2, 3, 5, 7, 11, len(TEXT)])
def test_a_streamed_answer_cut_anywhere_gives_the_whole_parse(step):
    stream, content, calls = ToolStream(), "", []
    for i in range(0, len(TEXT), step):
        text, new = stream.feed(TEXT[i:i + step])
        content, calls = content + text, calls + new
    text, new = stream.feed("", done=True)
    content, calls = content + text, calls + new
    whole_content, whole_calls = parse_tool_calls(TEXT)
    assert content.strip() == whole_content
    assert [c["function"] for c in calls] == [c["function"] for c in whole_calls]


def test_text_that_only_looks_like_a_call_is_released():
    stream = ToolStream()
    assert stream.feed("a <tool") == ("a ", [])  # may begin a call: held
    assert stream.feed("box> b") == ("<toolbox> b", [])
    assert stream.feed("<tool_call>{unclosed") == ("", [])
    assert stream.feed("", done=True) == ("<tool_call>{unclosed", [])


def request(**fields) -> ChatRequest:
    return ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], **fields)


@functools.cache
def tokenizers() -> tuple[Tokenizer, llguidance.LLTokenizer]:
    tokenizer = Tokenizer.from_dir(DEFAULT_MODEL)
    return tokenizer, llguidance.LLTokenizer((DEFAULT_MODEL / "tokenizer.json").read_text(), n_vocab=151936,
                                             eos_token=tokenizer.eos_token_ids[0])


def matches(source: str, text: str) -> bool:
    tokenizer, lltok = tokenizers()
    matcher = llguidance.LLMatcher(lltok, source, log_level=0)
    return matcher.consume_tokens(tokenizer.encode(text)) and matcher.is_accepting()


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def test_grammars_accept_what_they_should_and_nothing_else():
    assert grammar(request()) is None and grammar(request(response_format={"type": "text"})) is None
    any_object = grammar(request(response_format={"type": "json_object"}))
    assert matches(any_object, '{"a": [1, 2]}') and not matches(any_object, "[1]")
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    typed = grammar(request(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}))
    assert matches(typed, '{"n": 3}') and not matches(typed, '{"n": "3"}') and not matches(typed, '{"n":  3}')
    forced = grammar(request(tools=TOOLS, tool_choice="required"))
    assert matches(forced, CALL) and not matches(forced, CALL.replace("get_weather", "get_time"))
    assert grammar(request(tools=TOOLS, tool_choice="auto")) is None


def test_contradictory_or_dangling_tool_settings_are_refused():
    with pytest.raises(ValueError, match="has no tools"):
        request(tool_choice="required")
    with pytest.raises(ValueError, match="not among the tools"):
        request(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "other"}})
    with pytest.raises(ValueError, match="give one"):
        request(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"})
