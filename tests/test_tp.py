"""Tensor parallelism (--tp 2: two gloo ranks on this CPU) gives the single-rank model's logits and greedy tokens,
in the model and through the real pipeline; sizes that do not divide are refused with what would."""

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from common.options import Options
from frontend.pipeline import Pipeline, collect
from frontend.prompt import Prompter
from llm_worker import parallel
from llm_worker.engine import Engine
from llm_worker.model import LanguageModel
from tests.test_pipeline import CASES, request

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[151644, 872, 198, 9707, 1879, 0, 151645], [151644, 872, 198, 3838, 151645]]  # two rows, 7 and 5 long
DECODE_STEPS = 6


@pytest.fixture(scope="module")
def leader(tiny_model):
    """This process as rank 0 of two (the tiny config: 4 heads, 2 KV heads, intermediate 128); the follower is its
    child."""
    threads = torch.get_num_threads()
    leader = parallel.launch(Options(model=tiny_model, dtype="float32", tp=2), "cpu")
    yield leader
    leader.close()
    torch.set_num_threads(threads)


def greedy_logits(model, prompts, steps) -> list[torch.Tensor]:
    """Prefills each prompt into its own cache row, then decodes the rows together, greedily: each forward's logits."""
    cache = model.new_cache(len(prompts), 32)
    out, last = [], []
    with torch.inference_mode():
        for row, ids in enumerate(prompts):
            slots = torch.arange(len(ids))[None]
            logits = model(model.embed(torch.tensor([ids])), slots.expand(3, 1, -1), slots, cache,
                           logits_at=slots[:, -1], first_row=row)  # (1, vocab)
            out.append(logits)
            last.append(int(logits.argmax()))
        lengths = torch.tensor([len(p) for p in prompts])
        for _ in range(steps):
            slots = lengths[:, None]  # (B, 1)
            logits = model(model.embed(torch.tensor(last)[:, None]), slots[None].expand(3, -1, -1), slots, cache)[:, -1]
            out.append(logits)
            last, lengths = logits.argmax(-1).tolist(), lengths + 1
    return out


def test_tp2_gives_tp1_logits_and_greedy_tokens_in_float32(leader, tiny_model):
    single = LanguageModel.from_pretrained(tiny_model, torch.float32)
    expected, got = greedy_logits(single, PROMPTS, DECODE_STEPS), greedy_logits(leader, PROMPTS, DECODE_STEPS)
    assert len(got) == len(PROMPTS) + DECODE_STEPS
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=0)
        assert g.argmax(-1).tolist() == e.argmax(-1).tolist()


def test_tp2_engine_moves_cache_rows_on_every_rank(leader, tiny_model):
    """Three requests in two rows: the first to finish frees its row, the last row moves into it, the third joins."""
    def tokens(model):
        from common.messages import SamplingParams

        engine = Engine(model, max_batch=2, max_len=32)
        seqs = []
        for ids, n in zip([*PROMPTS, PROMPTS[0][2:]], (3, 8, 5)):
            embeds = model.embed(torch.tensor(ids))
            positions = torch.arange(len(ids)).expand(3, -1)
            if len(engine.active) == 2:
                while all(s.finish_reason is None for s in seqs):
                    engine.step()
            seqs.append(engine.add(embeds, positions, 0, SamplingParams(max_new_tokens=n, ignore_eos=True), []))
        while any(s.finish_reason is None for s in seqs):
            engine.step()
        return [s.tokens for s in seqs]

    assert tokens(leader) == tokens(LanguageModel.from_pretrained(tiny_model, torch.float32))


@pytest.mark.parametrize("tp, what", [(3, "attention heads 4, KV heads 2, intermediate size 128"), (4, "KV heads 2")])
def test_sizes_that_do_not_divide_are_refused_naming_them(tiny_model, tp, what):
    with pytest.raises(ValueError, match=f"{what} do not divide by {tp} \\(--tp may be 1, 2\\)"):
        parallel.launch(Options(model=tiny_model, dtype="float32", tp=tp), "cpu")


def test_quantized_weights_with_tp_are_refused(tiny_model):
    with pytest.raises(ValueError, match="not supported with --tp above 1 yet"):
        parallel.launch(Options(model=tiny_model, dtype="float32", tp=2, quantization="int8"), "cpu")


def test_followers_die_with_rank_0(tiny_model, tmp_path):
    worker = subprocess.Popen([sys.executable, "-m", "llm_worker", "--model", str(tiny_model), "--tp", "2",
                               "--results", f"ipc://{tmp_path}/results", "--control", f"ipc://{tmp_path}/control"],
                              cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not (followers := [p for p in psutil.Process(worker.pid).children()
                                 if "spawn_main" in " ".join(p.cmdline())]):  # not the resource tracker
            assert time.monotonic() < deadline, "no follower started"
            time.sleep(0.2)
        time.sleep(2)
    finally:
        worker.kill()
        worker.wait()
    _, alive = psutil.wait_procs(followers, timeout=10)
    assert not alive, "the follower outlived rank 0"


def pipeline_tokens(model, tp: int) -> dict[str, list[int]]:
    pipeline = Pipeline(Options(model=model, dtype="float32", chunk_width=24, tp=tp))
    pipeline.start()
    try:
        pipeline.wait_ready()
        prompter = Prompter(model, pipeline.context_len)
        return {name: collect(pipeline, prompter.request(*request(**CASES[name])))["token_ids"]
                for name in ("two images", "text only")}
    finally:
        pipeline.close()


def test_pipeline_with_tp2_gives_tp1_greedy_tokens(tiny_model):
    assert pipeline_tokens(tiny_model, tp=2) == pipeline_tokens(tiny_model, tp=1)
