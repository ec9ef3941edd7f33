"""The generation engine on a mock model (no weights): stopping, sampling, and continuous batching."""

import pytest
import torch

from common.messages import SamplingParams
from llm_worker.engine import Engine, sample

VOCAB = 50


class MockCache:
    def __init__(self, batch, max_len):
        self.tokens = torch.zeros(batch, max_len, dtype=torch.long)

    def move_row(self, src, dst):
        self.tokens[dst] = self.tokens[src]


class CountingModel:
    """Next token = (sum of every token in this sequence's cache row, positions included) % VOCAB, so a sequence
    whose row was mixed up with another's, or whose positions are off, goes astray."""

    device = torch.device("cpu")

    def new_cache(self, batch, max_len):
        return MockCache(batch, max_len)

    def embed(self, ids):
        return ids[..., None].float()

    def __call__(self, embeds, positions, slots, cache, logits_at=None, first_row=0):
        B, S, _ = embeds.shape
        rows = torch.arange(first_row, first_row + B)[:, None]
        cache.tokens[rows, slots] = embeds[..., 0].long() + positions[0]
        totals = torch.stack([cache.tokens[first_row + b, : int(slots[b].max()) + 1].sum() for b in range(B)])
        logits = torch.nn.functional.one_hot(totals % VOCAB, VOCAB).float()[:, None].expand(B, S, VOCAB)
        return logits[:, -1] if logits_at is not None else logits


def run_alone(prompt, params, eos=()):
    engine = Engine(CountingModel(), max_batch=1, max_len=64)
    embeds = torch.tensor(prompt, dtype=torch.float)[:, None]
    positions = torch.arange(len(prompt)).expand(3, -1)
    return [t for t, _ in engine.generate(embeds, positions, 0, params, eos)]


def test_greedy_follows_the_model():
    # prompt [1, 2] at positions [0, 1]: row holds 1, 3 -> total 4; then token 4 at position 2 adds 6 -> 10 ...
    assert run_alone([1, 2], SamplingParams(max_new_tokens=3)) == [4, 10, 23]


def test_stops_at_eos_with_reason_stop():
    engine = Engine(CountingModel(), max_batch=1, max_len=64)
    out = list(engine.generate(torch.tensor([[1.0], [2.0]]), torch.arange(2).expand(3, -1), 0,
                               SamplingParams(max_new_tokens=10), eos_token_ids=[10]))
    assert out == [(4, None), (10, "stop")]


def test_ignore_eos_runs_past_eos_to_max_new_tokens():
    engine = Engine(CountingModel(), max_batch=1, max_len=64)
    out = list(engine.generate(torch.tensor([[1.0], [2.0]]), torch.arange(2).expand(3, -1), 0,
                               SamplingParams(max_new_tokens=3, ignore_eos=True), eos_token_ids=[10]))
    assert out == [(4, None), (10, None), (23, "length")]  # the tokens of test_greedy_follows_the_model


def test_stops_at_max_new_tokens_with_reason_length():
    engine = Engine(CountingModel(), max_batch=1, max_len=64)
    out = list(engine.generate(torch.tensor([[1.0]]), torch.zeros(3, 1, dtype=torch.long), 0,
                               SamplingParams(max_new_tokens=2), []))
    assert [reason for _, reason in out] == [None, "length"]


def test_stops_at_the_end_of_the_context():
    engine = Engine(CountingModel(), max_batch=1, max_len=4)
    out = list(engine.generate(torch.tensor([[1.0], [2.0]]), torch.arange(2).expand(3, -1), 0,
                               SamplingParams(max_new_tokens=100), []))
    assert len(out) == 3 and out[-1][1] == "length"  # slots 2 and 3 filled by decode; the third token has no slot


def test_a_prompt_longer_than_the_context_is_refused():
    engine = Engine(CountingModel(), max_batch=1, max_len=4)
    with pytest.raises(ValueError, match="prompt of 4 tokens"):
        engine.add(torch.zeros(4, 1), torch.zeros(3, 4, dtype=torch.long), 0, SamplingParams(), [])


def test_rope_delta_shifts_decode_positions():
    engine = Engine(CountingModel(), max_batch=1, max_len=64)
    out = [t for t, _ in engine.generate(torch.tensor([[1.0], [2.0]]), torch.arange(2).expand(3, -1), 5,
                                         SamplingParams(max_new_tokens=2), [])]
    assert out == [4, 15]  # token 4 written at slot 2 with position 2 + 5: 4 + 4 + 7 = 15


def test_requests_joining_and_leaving_get_the_tokens_they_get_alone():
    prompts = {"a": [1, 2, 3], "b": [7], "c": [4, 4, 4, 4, 4], "d": [9, 1]}
    lengths = {"a": 3, "b": 9, "c": 5, "d": 6}
    alone = {k: run_alone(p, SamplingParams(max_new_tokens=lengths[k])) for k, p in prompts.items()}
    engine = Engine(CountingModel(), max_batch=3, max_len=64)
    seqs, got = {}, {}

    def join(k):
        p = prompts[k]
        seqs[k] = engine.add(torch.tensor(p, dtype=torch.float)[:, None], torch.arange(len(p)).expand(3, -1), 0,
                             SamplingParams(max_new_tokens=lengths[k]), [])

    join("a"), join("b")
    engine.step()
    join("c")  # joins while a and b are mid-generation
    while any(s.finish_reason is None for s in seqs.values()):
        engine.step()
        if seqs["a"].finish_reason and "d" not in seqs:
            join("d")  # takes a's row once it has been released
    got = {k: s.tokens for k, s in seqs.items()}
    assert got == alone


def test_engine_refuses_more_requests_than_rows():
    engine = Engine(CountingModel(), max_batch=1, max_len=16)
    engine.add(torch.zeros(1, 1), torch.zeros(3, 1, dtype=torch.long), 0, SamplingParams(), [])
    with pytest.raises(RuntimeError, match="full"):
        engine.add(torch.zeros(1, 1), torch.zeros(3, 1, dtype=torch.long), 0, SamplingParams(), [])


LOGITS = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])


def test_top_k_1_and_tiny_top_p_are_greedy():
    g = torch.Generator().manual_seed(0)
    assert {sample(LOGITS, SamplingParams(temperature=1.0, top_k=1), g) for _ in range(50)} == {4}
    assert {sample(LOGITS, SamplingParams(temperature=1.0, top_p=0.01), g) for _ in range(50)} == {4}


def test_top_k_keeps_only_the_k_most_likely():
    g = torch.Generator().manual_seed(0)
    assert {sample(LOGITS, SamplingParams(temperature=5.0, top_k=2), g) for _ in range(300)} == {3, 4}


def test_top_p_keeps_the_smallest_set_reaching_p():
    # softmax(LOGITS): 0.636, 0.234, 0.086, ... ; top_p 0.8 keeps {4, 3}
    g = torch.Generator().manual_seed(0)
    assert {sample(LOGITS, SamplingParams(temperature=1.0, top_p=0.8), g) for _ in range(300)} == {3, 4}


def test_temperature_sampling_follows_the_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.0, torch.log(torch.tensor(3.0))])  # p = 0.25, 0.75
    draws = [sample(logits, SamplingParams(temperature=1.0), g) for _ in range(4000)]
    assert abs(sum(draws) / 4000 - 0.75) < 0.03


def test_same_seed_same_tokens():
    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return [sample(LOGITS, SamplingParams(temperature=2.0, seed=seed), g) for _ in range(20)]

    assert draw(7) == draw(7) and draw(7) != draw(8)


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-1),
                                 dict(stop=[""]), dict(stop=[3])])
def test_bad_sampling_settings_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_the_smallest_temperatures_sample_the_best_token_with_finite_probabilities():
    logits = torch.tensor([0.0, 3.0, 1.0, -2.0])
    for t in (1e-37, 5e-324, 1e-45):
        assert sample(logits, SamplingParams(temperature=t), torch.Generator().manual_seed(0)) == 1


def test_non_finite_logits_do_not_poison_sampling():
    generator = torch.Generator().manual_seed(0)
    assert sample(torch.tensor([0.0, float("inf"), 1.0]), SamplingParams(temperature=1.0), generator) == 1
    assert sample(torch.tensor([float("nan"), 2.0, 1.0]), SamplingParams(temperature=1.0, top_k=1), generator) == 1


def test_a_sequence_whose_sampling_fails_ends_alone_with_its_error(monkeypatch):
    from llm_worker import engine as engine_module

    real = engine_module.sample

    def flaky(logits, params, generator):
        if params.seed == 13:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(logits, params, generator)

    engine = Engine(CountingModel(), max_batch=2, max_len=64)
    prompt = torch.tensor([[1.0], [2.0]])
    positions = torch.arange(2).expand(3, -1)
    good = engine.add(prompt, positions, 0, SamplingParams(max_new_tokens=3), [])
    monkeypatch.setattr(engine_module, "sample", flaky)
    doomed = engine.add(prompt, positions, 0, SamplingParams(max_new_tokens=3, temperature=0.5, seed=12), [])
    doomed.params = SamplingParams(max_new_tokens=3, temperature=0.5, seed=13)  # its next sample fails
    engine.step()
    assert doomed.finish_reason == "error" and "probability tensor" in str(doomed.error)
    while good.finish_reason is None:
        engine.step()
    assert good.tokens == [4, 10, 23] and engine.active == [good]  # the tokens of test_greedy_follows_the_model


def test_a_failed_prefill_sample_takes_no_row(monkeypatch):
    from llm_worker import engine as engine_module

    monkeypatch.setattr(engine_module, "sample", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    engine = Engine(CountingModel(), max_batch=1, max_len=64)
    with pytest.raises(RuntimeError, match="boom"):
        engine.add(torch.tensor([[1.0]]), torch.zeros(3, 1, dtype=torch.long), 0, SamplingParams(), [])
    assert engine.active == []
    monkeypatch.undo()
    assert run_alone([1, 2], SamplingParams(max_new_tokens=3)) == [4, 10, 23]


def test_abort_all_ends_every_row_with_the_error():
    engine = Engine(CountingModel(), max_batch=2, max_len=64)
    seqs = [engine.add(torch.tensor([[1.0]]), torch.zeros(3, 1, dtype=torch.long), 0, SamplingParams(), [])
            for _ in range(2)]
    failed = engine.abort_all(RuntimeError("step failed"))
    assert failed == seqs and engine.active == [] and all(s.finish_reason == "error" for s in seqs)


class FixedModel(CountingModel):
    """The same logits at every step, whatever the input: LOGITS, descending with a step of 0.25, so a token's place
    changes only by what stands between the logits and the draw."""

    LOGITS = torch.arange(VOCAB, 0, -1).float() * 0.25

    def __call__(self, embeds, positions, slots, cache, logits_at=None, first_row=0):
        B, S, _ = embeds.shape
        logits = self.LOGITS.expand(B, S, VOCAB)
        return logits[:, -1] if logits_at is not None else logits


def run_fixed(params, prompt=(1, 2), constraint=None):
    engine = Engine(FixedModel(), max_batch=2, max_len=64)
    embeds = torch.tensor(prompt, dtype=torch.float)[:, None]
    seq = engine.add(embeds, torch.arange(len(prompt)).expand(3, -1), 0, params, (), prompt, constraint)
    while seq.finish_reason is None:
        engine.step()
    return seq


def test_frequency_and_presence_penalties_follow_openai_formula():
    """logit - frequency_penalty * count - presence_penalty * (count > 0), counted over the output only."""
    params = SamplingParams(max_new_tokens=12, frequency_penalty=0.6, presence_penalty=0.3)
    counts, expected = torch.zeros(VOCAB), []
    for _ in range(12):
        expected.append(int((FixedModel.LOGITS - 0.6 * counts - 0.3 * (counts > 0)).argmax()))
        counts[expected[-1]] += 1
    assert run_fixed(params, prompt=(0, 1)).tokens == expected
    assert len(set(expected)) > 1  # the penalties changed the answer: plain greedy repeats token 0


def test_repetition_penalty_equals_transformers_processor_over_prompt_and_output():
    from transformers import RepetitionPenaltyLogitsProcessor

    processor, ids = RepetitionPenaltyLogitsProcessor(1.8), torch.tensor([[0, 3]])
    expected = []
    for _ in range(8):
        expected.append(int(processor(ids, FixedModel.LOGITS[None].clone()).argmax()))
        ids = torch.cat([ids, torch.tensor([[expected[-1]]])], 1)
    assert run_fixed(SamplingParams(max_new_tokens=8, repetition_penalty=1.8), prompt=(0, 3)).tokens == expected
    assert expected[0] == 1  # the prompt's tokens 0 and 3 were penalised too


def test_logit_bias_moves_tokens():
    assert run_fixed(SamplingParams(max_new_tokens=3, logit_bias={7: 100.0})).tokens == [7, 7, 7]
    assert run_fixed(SamplingParams(max_new_tokens=2, logit_bias={0: -100.0})).tokens == [1, 1]
    with pytest.raises(ValueError, match="past this model's 50 logits"):
        run_fixed(SamplingParams(max_new_tokens=2, logit_bias={VOCAB: 1.0}))


def test_logprobs_are_the_raw_logits_log_softmax_with_the_top_ones():
    params = SamplingParams(max_new_tokens=3, logprobs=4, logit_bias={5: 100.0})
    seq = run_fixed(params)
    reference = torch.log_softmax(FixedModel.LOGITS, -1)  # raw: before logit_bias, as vLLM reports them
    assert seq.tokens == [5, 5, 5] and len(seq.logprobs) == 3
    for lp in seq.logprobs:
        assert lp.logprob == pytest.approx(float(reference[5]), abs=1e-6)
        assert [t for t, _ in lp.top] == [0, 1, 2, 3]
        assert [v for _, v in lp.top] == pytest.approx(reference[:4].tolist(), abs=1e-6)
    assert run_fixed(SamplingParams(max_new_tokens=2)).logprobs == []


class EvenTokens:
    """A grammar that allows even tokens only, records what it was given, and breaks at its token number fail_at."""

    def __init__(self, fail_at=None):
        self.accepted, self.fail_at = [], fail_at

    def allowed(self, vocab):
        return torch.arange(vocab) % 2 == 0

    def accept(self, token):
        if len(self.accepted) == self.fail_at:
            raise ValueError("left the grammar")
        self.accepted.append(token)


def test_a_constraint_masks_every_draw_greedy_and_sampled():
    grammar = EvenTokens()
    seq = run_fixed(SamplingParams(max_new_tokens=6, logit_bias={1: 100.0}), constraint=grammar)
    assert seq.tokens == [0] * 6 and grammar.accepted == seq.tokens  # the biased odd token stays masked
    grammar = EvenTokens()
    seq = run_fixed(SamplingParams(max_new_tokens=20, temperature=5.0, seed=3), constraint=grammar)
    assert all(t % 2 == 0 for t in seq.tokens) and len(set(seq.tokens)) > 1 and grammar.accepted == seq.tokens


def test_a_sequence_whose_token_breaks_its_grammar_fails_alone():
    engine = Engine(FixedModel(), max_batch=2, max_len=64)
    embeds, positions = torch.tensor([[1.0]]), torch.zeros(3, 1, dtype=torch.long)
    bad = engine.add(embeds, positions, 0, SamplingParams(max_new_tokens=5), (), (1,), EvenTokens(fail_at=2))
    good = engine.add(embeds, positions, 0, SamplingParams(max_new_tokens=5), (), (1,), EvenTokens())
    while good.finish_reason is None:
        engine.step()
    assert bad.finish_reason == "error" and "left the grammar" in str(bad.error) and len(bad.tokens) == 2
    assert good.tokens == [0] * 5 and good.finish_reason == "length"


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_decode():
    """Chunks give the tokens a whole prefill gives; each step both advances the prefill and decodes the others; a
    request that finishes meanwhile moves the prefilling row down, and the answer is still right."""
    long_prompt, params = list(range(1, 11)), SamplingParams(max_new_tokens=4)
    alone = run_alone(long_prompt, params)
    engine = Engine(CountingModel(), max_batch=3, max_len=64, prefill_chunk=3)
    embeds = lambda p: torch.tensor(p, dtype=torch.float)[:, None]  # noqa: E731
    short = engine.add(embeds([1, 2]), torch.arange(2).expand(3, -1), 0, SamplingParams(max_new_tokens=2), ())
    other = engine.add(embeds([3]), torch.arange(1).expand(3, -1), 0, SamplingParams(max_new_tokens=6), ())
    assert short.tokens and other.tokens  # within the chunk: prefilled at once
    seq = engine.add(embeds(long_prompt), torch.arange(10).expand(3, -1), 0, params, ())
    assert seq.tokens == [] and engine.prefilling is not None and not engine.can_add()
    for step in range(4):  # chunks of 3, 3, 3, 1; `short` finishes after the first step
        got = engine.step()
        assert other in got and len(other.tokens) == 2 + step
        assert (seq in got) == (step == 3)
    assert seq.tokens == alone[:1] and engine.prefilling is None
    while seq.finish_reason is None:
        engine.step()
    assert seq.tokens == alone and other.tokens == run_alone([3], SamplingParams(max_new_tokens=6))


def test_a_prompt_cancelled_or_failing_while_prefilling_frees_its_place():
    engine = Engine(CountingModel(), max_batch=2, max_len=64, prefill_chunk=2)
    seq = engine.add(torch.ones(6, 1), torch.arange(6).expand(3, -1), 0, SamplingParams(), ())
    engine.step()
    seq.finish_reason = "cancelled"
    assert engine.can_add() and engine.prefilling is None
    seq = engine.add(torch.ones(6, 1), torch.arange(6).expand(3, -1), 0, SamplingParams(),
                     (), constraint=EvenTokens(fail_at=0))
    got = engine.step() + engine.step() + engine.step()
    assert seq in got and seq.finish_reason == "error" and engine.prefilling is None and engine.active == []
    assert list(Engine(CountingModel(), 1, 64, prefill_chunk=2).generate(
        torch.tensor([[1.0], [2.0], [3.0]]), torch.arange(3).expand(3, -1), 0, SamplingParams(max_new_tokens=2), ())) \
        == list(Engine(CountingModel(), 1, 64).generate(
            torch.tensor([[1.0], [2.0], [3.0]]), torch.arange(3).expand(3, -1), 0, SamplingParams(max_new_tokens=2), ()))
