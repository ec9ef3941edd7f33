"""Every sampling and output parameter of the chat API through the official openai client against `launch.py serve`
on the tiny random-weight checkpoint: n, logprobs (against transformers' float32 log-softmax), the penalties (against
transformers' generate where it has them), logit_bias, response_format (output parses and validates even on random
weights), forced tool calls and a tool round trip, developer and tool roles, bare-string image_url,
mm_processor_kwargs, --limit-mm-per-prompt, generation_config.json defaults, and /metrics counting what was asked."""

import json
import re
import subprocess
import sys

import httpx
import openai
import pytest
import torch

from common.tokenizer import Tokenizer
from tests.test_server import MODEL, PNG, ROOT, data_uri, image_part, start_server, stop_server
from visual_worker.preprocess import smart_resize


@pytest.fixture(scope="module")
def server(tiny_model):
    proc, url = start_server(tiny_model, "--limit-mm-per-prompt", "image=2,video=0")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)


def chat(client, content="Describe the weather.", max_tokens=6, **kwargs):
    messages = content if isinstance(content, list) else [{"role": "user", "content": content}]
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, **kwargs)


def prompt_ids(server, messages) -> list[int]:
    return httpx.post(f"{server}/tokenize", json={"model": MODEL, "messages": messages}).json()["tokens"]


def hf_greedy(reference, ids: list[int], n: int, **kwargs) -> list[int]:
    out = reference.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n, **kwargs)
    return out[0, len(ids):].tolist()


def test_n_greedy_gives_equal_choices_and_seeded_sampling_distinct_reproducible_ones(client):
    greedy = chat(client, n=2, temperature=0)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    assert greedy.usage.completion_tokens == 12 and greedy.usage.prompt_tokens == chat(client, temperature=0).usage.prompt_tokens
    sampled = chat(client, n=3, temperature=1.0, seed=7, max_tokens=8)
    texts = [c.message.content for c in sampled.choices]
    assert len(set(texts)) == 3
    assert [c.message.content for c in chat(client, n=3, temperature=1.0, seed=7, max_tokens=8).choices] == texts
    streamed = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Describe the weather."}],
                                              max_tokens=8, n=3, temperature=1.0, seed=7, stream=True)
    parts = {0: "", 1: "", 2: ""}
    for event in streamed:
        for c in event.choices:
            parts[c.index] += c.delta.content or ""
    assert [parts[i] for i in range(3)] == texts


def test_logprobs_equal_transformers_log_softmax_in_float32(server, client, reference):
    messages = [{"role": "user", "content": "Name a colour."}]
    ids = prompt_ids(server, messages)
    tokens = hf_greedy(reference, ids, 5)
    with torch.no_grad():
        logits = reference(torch.tensor([ids + tokens[:-1]])).logits[0, len(ids) - 1:].float()
    expected = torch.log_softmax(logits, -1)  # (5, vocab)
    tokenizer = Tokenizer.from_dir(reference.name_or_path)
    for stream in (False, True):
        kwargs = dict(max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
        if stream:
            content = [lp for event in client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                                      **kwargs)
                       for c in event.choices if c.logprobs for lp in c.logprobs.content]
        else:
            content = client.chat.completions.create(model=MODEL, messages=messages, **kwargs).choices[0].logprobs.content
        assert len(content) == 5
        for step, (entry, token) in enumerate(zip(content, tokens)):
            assert bytes(entry.bytes) == tokenizer.token_bytes(token)
            assert entry.logprob == pytest.approx(float(expected[step, token]), abs=1e-4)
            top = torch.topk(expected[step], 3)
            assert [bytes(t.bytes) for t in entry.top_logprobs] == [tokenizer.token_bytes(i) for i in top.indices.tolist()]
            assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert chat(client, temperature=0).choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        chat(client, top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        chat(client, logprobs=True, top_logprobs=21)


def test_repetition_penalty_equals_transformers_generate(server, client, reference):
    """The prompt holds the text of the first tokens the model would answer, so penalising the prompt's tokens
    changes the answer (random weights never repeat on their own)."""
    tokenizer = Tokenizer.from_dir(reference.name_or_path)
    first = hf_greedy(reference, prompt_ids(server, [{"role": "user", "content": "Hi"}]), 3)
    messages = [{"role": "user", "content": "Hi " + tokenizer.decode(first)}]
    ids = prompt_ids(server, messages)
    expected = hf_greedy(reference, ids, 8, repetition_penalty=1.7)
    assert expected != hf_greedy(reference, ids, 8)  # the penalty matters on this prompt
    answer = chat(client, messages, max_tokens=8, temperature=0, logprobs=True, extra_body={"repetition_penalty": 1.7})
    assert [bytes(e.bytes) for e in answer.choices[0].logprobs.content] == [tokenizer.token_bytes(t) for t in expected]


def test_frequency_and_presence_penalties_and_logit_bias_change_greedy_answers(server, client, reference):
    messages = [{"role": "user", "content": "Say something long."}]
    ids = prompt_ids(server, messages)
    tokenizer = Tokenizer.from_dir(reference.name_or_path)
    counts, expected = torch.zeros(reference.config.text_config.vocab_size), []
    with torch.no_grad():
        for _ in range(8):  # OpenAI's formula on transformers' float32 logits
            logits = reference(torch.tensor([ids + expected])).logits[0, -1].float()
            expected.append(int((logits + 2.0 * counts + 0.5 * (counts > 0)).argmax()))
            counts[expected[-1]] += 1
    assert expected != hf_greedy(reference, ids, 8)  # negative penalties make it repeat: random weights never do
    answer = chat(client, messages, max_tokens=8, temperature=0, frequency_penalty=-2.0, presence_penalty=-0.5,
                  logprobs=True)
    assert [bytes(e.bytes) for e in answer.choices[0].logprobs.content] == [tokenizer.token_bytes(t) for t in expected]
    target = tokenizer.encode(" blue")[0]
    biased = chat(client, messages, temperature=0, logit_bias={str(target): 100}, max_tokens=4)
    assert biased.choices[0].message.content == " blue" * 4
    for bad in ({"abc": 1}, {"999999999": 1}):
        with pytest.raises(openai.BadRequestError, match="logit_bias") as e:
            chat(client, logit_bias=bad)
        assert e.value.body["param"] == "logit_bias"
    for field, value in (("frequency_penalty", 2.5), ("presence_penalty", -3), ("repetition_penalty", 0)):
        with pytest.raises(openai.BadRequestError, match=field):
            chat(client, extra_body={field: value})


SCHEMA = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}, "big": {"type": "boolean"},
                                           "shape": {"const": "circle"}},
          "required": ["colour", "big", "shape"], "additionalProperties": False}


def validates(value, schema=SCHEMA) -> bool:
    return (isinstance(value, dict) and set(value) == set(schema["required"])
            and value["colour"] in schema["properties"]["colour"]["enum"] and isinstance(value["big"], bool)
            and value["shape"] == "circle")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_output_parses_and_validates_even_on_random_weights(client, seed):
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    answer = chat(client, "Describe it as JSON.", max_tokens=60, temperature=1.0, seed=seed, response_format=fmt)
    assert answer.choices[0].finish_reason == "stop"
    assert validates(json.loads(answer.choices[0].message.content))
    streamed = "".join(c.delta.content or "" for e in chat(client, "Describe it as JSON.", max_tokens=60,
                                                           temperature=1.0, seed=seed, response_format=fmt, stream=True)
                       for c in e.choices)
    assert streamed == answer.choices[0].message.content


def test_json_object_output_starts_an_object_and_bad_schemas_are_400(client):
    text = chat(client, max_tokens=30, temperature=0, response_format={"type": "json_object"}).choices[0].message.content
    assert text.lstrip().startswith("{")
    with pytest.raises(openai.BadRequestError, match="response_format") as e:
        chat(client, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}})
    assert e.value.body["param"] == "response_format"


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
                   "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]


def test_a_forced_tool_call_and_its_round_trip(server, client, tiny_model):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    answer = chat(client, ask, max_tokens=40, temperature=0, tools=TOOLS,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in ("Paris", "Oslo")
    required = chat(client, ask, max_tokens=40, temperature=1.0, seed=3, tools=TOOLS, tool_choice="required")
    assert required.choices[0].message.tool_calls[0].function.name in ("get_weather", "get_time")
    streamed = list(chat(client, ask, max_tokens=40, temperature=0, tools=TOOLS, stream=True,
                         tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    deltas = [tc for e in streamed for c in e.choices for tc in (c.delta.tool_calls or [])]
    assert [(d.function.name, d.function.arguments) for d in deltas] == [("get_weather", call.function.arguments)]
    assert streamed[-1].choices[0].finish_reason == "tool_calls"
    # the round trip: the call and its result go back, rendered in Qwen2.5's format, and the model answers
    turn = ask + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                  {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}]
    back = chat(client, turn, max_tokens=5, temperature=0, tools=TOOLS)
    assert back.choices[0].finish_reason in ("length", "stop")
    ids = prompt_ids(server, turn)
    text = Tokenizer.from_dir(tiny_model).decode(ids, False)
    assert f'<tool_call>\n{{"name": "get_weather", "arguments": {call.function.arguments}}}\n</tool_call><|im_end|>' \
           in text and "<|im_start|>user\n<tool_response>\nSunny, 21 C\n</tool_response><|im_end|>" in text
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        chat(client, ask, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})


def test_tools_are_shown_to_the_model_unless_tool_choice_is_none(client):
    plain = chat(client, temperature=0).usage.prompt_tokens
    assert chat(client, temperature=0, tools=TOOLS).usage.prompt_tokens > plain + 50
    assert chat(client, temperature=0, tools=TOOLS, tool_choice="none").usage.prompt_tokens == plain


def test_developer_role_is_system_and_a_bare_image_url_is_an_image(client):
    system = chat(client, [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}], temperature=0)
    developer = chat(client, [{"role": "developer", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
                     temperature=0)
    assert developer.choices[0].message.content == system.choices[0].message.content
    assert developer.usage.prompt_tokens == system.usage.prompt_tokens
    full = chat(client, [{"role": "user", "content": [image_part(PNG["small"]), {"type": "text", "text": "What?"}]}],
                temperature=0)
    bare = chat(client, [{"role": "user", "content": [{"type": "image_url", "image_url": data_uri(PNG["small"])},
                                                      {"type": "text", "text": "What?"}]}], temperature=0)
    assert bare.choices[0].message.content == full.choices[0].message.content
    assert bare.usage.prompt_tokens == full.usage.prompt_tokens


def test_a_malformed_message_names_the_field_not_a_union_branch(client):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, [{"role": "user", "content": 42}])
    assert ".str" not in e.value.body["message"] and "messages.0.content" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="needs content"):
        chat(client, [{"role": "user", "content": None}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        chat(client, max_tokens=0)


def test_mm_processor_kwargs_set_the_resized_area_per_request(client, tiny_model):
    content = [image_part(PNG["tall"]), {"type": "text", "text": "What?"}]
    default = chat(client, [{"role": "user", "content": content}], temperature=0).usage.prompt_tokens
    small = chat(client, [{"role": "user", "content": content}], temperature=0,
                 extra_body={"mm_processor_kwargs": {"max_pixels": 56 * 56}}).usage.prompt_tokens
    h, w = smart_resize(300, 200, 28, 3136, 12845056)
    h2, w2 = smart_resize(300, 200, 28, 3136, 56 * 56)
    assert default - small == (h * w - h2 * w2) // (28 * 28) > 0
    with pytest.raises(openai.BadRequestError, match="min_pixels .* is above max_pixels"):
        chat(client, [{"role": "user", "content": content}],
             extra_body={"mm_processor_kwargs": {"min_pixels": 10000, "max_pixels": 5000}})
    with pytest.raises(openai.BadRequestError, match="mm_processor_kwargs"):
        chat(client, extra_body={"mm_processor_kwargs": {"size": 3}})
    # an image resized past what the context holds is refused before the ViT, with the numbers
    huge = 28 * 28 * 5000
    h3, w3 = smart_resize(300, 200, 28, huge, huge * 2)
    visual = h3 * w3 // (28 * 28)
    with pytest.raises(openai.BadRequestError, match=rf"\({visual} visual tokens\), over the 4095 this model's context"):
        chat(client, [{"role": "user", "content": content}],
             extra_body={"mm_processor_kwargs": {"min_pixels": huge, "max_pixels": huge * 2}})


def test_limit_mm_per_prompt_refuses_before_fetching(client):
    three = [image_part(PNG["small"])] * 3 + [{"type": "text", "text": "What?"}]
    with pytest.raises(openai.BadRequestError, match=r"3 images in one request; at most 2 .*--limit-mm-per-prompt"):
        chat(client, [{"role": "user", "content": three}])
    video = [{"type": "video_url", "video_url": {"url": "http://127.0.0.1:9/never.mp4"}}]
    with pytest.raises(openai.BadRequestError, match="1 videos in one request; at most 0"):
        chat(client, [{"role": "user", "content": video}])


def test_sampling_defaults_come_from_generation_config(client):
    """The tiny checkpoint's generation_config.json says do_sample false: a request that sets no temperature is
    greedy, as transformers' generate is on it."""
    unset = [chat(client, max_tokens=8).choices[0].message.content for _ in range(2)]
    assert unset == [chat(client, max_tokens=8, temperature=0).choices[0].message.content] * 2


def test_metrics_count_what_the_requests_did(server, client):
    def scrape() -> dict:
        text = httpx.get(f"{server}/metrics").text
        out = {}
        for line in text.splitlines():
            if m := re.match(r'^(vllm:[a-z0-9_]+)(\{[^}]*\})? ([0-9.e+-]+)$', line):
                if 'finished_reason="length"' in (m.group(2) or "") or "finished_reason" not in (m.group(2) or ""):
                    out[m.group(1)] = out.get(m.group(1), 0) + float(m.group(3))
        return out

    before = scrape()
    answers = [chat(client, f"Count to {i}.", max_tokens=4 + i, temperature=0) for i in range(3)]
    answers.append(chat(client, [{"role": "user", "content": [image_part(PNG["wide"]), {"type": "text", "text": "?"}]}],
                        max_tokens=3, temperature=0))
    after = scrape()

    def grew(name):
        return after.get(name, 0) - before.get(name, 0)

    assert grew("vllm:prompt_tokens_total") == sum(a.usage.prompt_tokens for a in answers)
    assert grew("vllm:generation_tokens_total") == sum(a.usage.completion_tokens for a in answers)
    assert grew("vllm:request_success_total") == 4  # all four ran to max_tokens
    assert grew("vllm:time_to_first_token_seconds_count") == 4 and grew("vllm:e2e_request_latency_seconds_count") == 4
    assert grew("vllm:inter_token_latency_seconds_count") == sum(a.usage.completion_tokens - 1 for a in answers)
    assert grew("vllm:mm_cache_queries_total") == 1
    assert after["vllm:num_requests_running"] == 0 and after["vllm:num_requests_waiting"] == 0


def test_completions_continue_the_prompt_as_it_is(server, client, reference):
    tokenizer = Tokenizer.from_dir(reference.name_or_path)
    ids = tokenizer.encode("The capital of France is")
    expected = hf_greedy(reference, ids, 6)
    answer = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0,
                                       logprobs=2)
    choice = answer.choices[0]
    assert choice.text == tokenizer.decode(expected) and answer.usage.prompt_tokens == len(ids)
    assert [t.encode() for t in choice.logprobs.tokens] == [tokenizer.token_bytes(t) for t in expected]
    with torch.no_grad():
        logits = reference(torch.tensor([ids + expected[:-1]])).logits[0, len(ids) - 1:].float()
    assert choice.logprobs.token_logprobs == pytest.approx(
        torch.log_softmax(logits, -1).gather(1, torch.tensor(expected)[:, None])[:, 0].tolist(), abs=1e-4)
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0, echo=True, n=2)
    assert [c.text for c in by_ids.choices] == ["The capital of France is" + choice.text] * 2
    streamed = "".join(c.text for e in client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0,
                                                                 stream=True) for c in e.choices)
    assert streamed == choice.text
    with pytest.raises(openai.BadRequestError, match="echo with logprobs"):
        client.completions.create(model=MODEL, prompt="x", echo=True, logprobs=1)
    with pytest.raises(openai.BadRequestError, match="past this model's vocabulary"):
        client.completions.create(model=MODEL, prompt=[10**9], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model=MODEL, prompt="x", suffix="y")


def test_hostile_schemas_get_clear_errors_and_others_are_served(client):
    deep = {"type": "string"}
    for _ in range(300):
        deep = {"type": "object", "properties": {"a": deep}, "required": ["a"]}
    with pytest.raises(openai.BadRequestError, match="response_format: the schema is not usable: recursion limit"):
        chat(client, response_format={"type": "json_schema", "json_schema": {"name": "deep", "schema": deep}})
    wide = {"anyOf": [{"type": "object", "properties": {f"k{i}": {"type": "integer"}}, "required": [f"k{i}"]}
                      for i in range(3000)]}  # past llguidance's 2000 items a row: the grammar fails as it runs
    with pytest.raises(openai.BadRequestError, match="grammar"):
        chat(client, max_tokens=20, temperature=0,
             response_format={"type": "json_schema", "json_schema": {"name": "wide", "schema": wide}})
    assert chat(client, temperature=0).choices[0].finish_reason == "length"


def test_metrics_after_a_benchmark_match_its_own_counts(server, tiny_model, tmp_path):
    """`launch.py bench` against the server: /metrics grew by the benchmark's requests and tokens, plus its one
    warm-up request (the first prompt again, output_len tokens); a repeated image is an encoder-cache hit."""
    def counters() -> dict:
        out = {}
        for line in httpx.get(f"{server}/metrics").text.splitlines():
            if m := re.match(r'^(vllm:[a-z0-9_]+)(\{[^}]*\})? ([0-9.e+-]+)$', line):
                out[m.group(1)] = out.get(m.group(1), 0) + float(m.group(3))
        return out

    before = counters()
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "launch.py", "bench", "--url", server, "--model", str(tiny_model),
                    "--image-size", "64x64", "--input-len", "12", "--output-len", "5", "--num-prompts", "6",
                    "--concurrency", "3", "--out", str(out)], cwd=ROOT, check=True, capture_output=True)
    after = counters()
    level = json.loads(out.read_text())["levels"][0]
    grew = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert level["completed"] == 6 and level["failed"] == 0
    warm_up = grew["vllm:prompt_tokens_total"] - level["total_input_tokens"]  # the first prompt's tokens
    assert 0.8 < warm_up / (level["total_input_tokens"] / 6) < 1.25  # prompts differ by a few re-encoded tokens
    assert grew["vllm:generation_tokens_total"] == level["total_output_tokens"] + 5
    assert grew["vllm:request_success_total"] == 7 and grew["vllm:e2e_request_latency_seconds_count"] == 7
    assert grew["vllm:mm_cache_queries_total"] == 7 and grew["vllm:mm_cache_hits_total"] >= 1  # the warm-up's image
