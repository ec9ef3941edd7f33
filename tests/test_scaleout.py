"""Many workers of each kind: each request goes to the LLM worker with the fewest requests per batch row and to the
least busy visual worker subscribed to it; answers are the same whichever workers serve them; a dead visual worker
loses only the requests it held and comes back; a worker of another model is refused."""

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import psutil
import pytest

from common.options import Options
from frontend.pipeline import Health, NoWorker, Pipeline, Route, answers, choose_workers
from frontend.prompt import Prompter
from tests.conftest import write_tiny_checkpoint
from tests.test_hostile import NORMAL, ask
from tests.test_pipeline import CASES, ROOT, reference_tokens, request
from tests.test_server import MODEL, start_server, stop_server


def ready(role: str, capacity: int = 1, subscribers: tuple[str, ...] = ()) -> Health:
    return Health(role, "ready", capacity=capacity, subscribers=subscribers)


# ---- the routing policy ----

def test_the_llm_worker_with_the_fewest_requests_per_batch_row_is_chosen():
    health = {"visual-0": ready("visual", subscribers=("llm-0", "llm-1")),
              "llm-0": ready("llm", capacity=8), "llm-1": ready("llm", capacity=2)}
    routes = [Route("visual-0", "llm-0", True)] * 3 + [Route("visual-0", "llm-1", True)]
    assert choose_workers(health, routes) == ("visual-0", "llm-0")  # 3/8 of its rows held against 1/2
    assert choose_workers(health, routes[:1] * 2) == ("visual-0", "llm-1")  # 2/8 against 0/2


def test_the_visual_worker_is_the_least_busy_of_those_subscribed_to_the_llm_worker():
    health = {"visual-0": ready("visual", subscribers=("llm-0",)), "visual-1": ready("visual", subscribers=("llm-0",)),
              "visual-2": ready("visual", subscribers=("llm-1",)), "llm-0": ready("llm"), "llm-1": ready("llm")}
    routes = [Route("visual-0", "llm-1", False)] + [Route("visual-1", "llm-1", True)] * 3
    # llm-0 holds nothing; of its visual workers, visual-1's requests are all decoding already: it holds none
    assert choose_workers(health, routes) == ("visual-1", "llm-0")
    assert choose_workers(health, routes, unreachable={"visual-1"}) == ("visual-0", "llm-0")


def test_ties_go_to_the_worker_that_has_served_fewest():
    health = {"visual-0": ready("visual", subscribers=("llm-0", "llm-1")), "llm-0": ready("llm"),
              "visual-1": ready("visual", subscribers=("llm-0", "llm-1")), "llm-1": ready("llm")}
    health["visual-0"].served = health["llm-0"].served = 5  # visual-1 and llm-1 have just been restarted
    assert choose_workers(health, []) == ("visual-1", "llm-1")


def test_workers_that_are_not_ready_or_not_joined_are_never_chosen():
    health = {"visual-0": ready("visual", subscribers=("llm-1",)), "llm-0": ready("llm"),
              "llm-1": Health("llm", "restarting"), "visual-1": Health("visual", "refused", subscribers=("llm-0",))}
    with pytest.raises(NoWorker, match="no ready visual worker and LLM worker joined to each other"):
        choose_workers(health, [])


# ---- real processes ----

@pytest.fixture(scope="module")
def two_by_two(tiny_model):
    pipeline = Pipeline(Options(model=tiny_model, dtype="float32", chunk_width=24, visual_workers=2, llm_workers=2))
    pipeline.start()
    pipeline.wait_ready()
    yield pipeline
    pipeline.close()


def test_two_visual_and_two_llm_workers_give_every_request_transformers_tokens(two_by_two, reference, tiny_model):
    prompter = Prompter(tiny_model, two_by_two.context_len)
    cases = list(CASES.values()) * 2
    requests = [prompter.request(*request(**case)) for case in cases]
    expected = {r.id: reference_tokens(reference, tiny_model, **case) for r, case in zip(requests, cases)}
    routed = {}

    def send(r):
        two_by_two.submit(r)
        routed[r.id] = (two_by_two.routes[r.id].visual, r.llm)

    results = dict((r.id, result) for r, result in answers(two_by_two, requests, in_flight=6, send=send))
    assert {rid: result.get("token_ids") for rid, result in results.items()} == expected
    assert {v for v, _ in routed.values()} == {"visual-0", "visual-1"}
    assert {llm for _, llm in routed.values()} == {"llm-0", "llm-1"}
    assert all(two_by_two.health[n].served > 0 for n in ("visual-0", "visual-1", "llm-0", "llm-1"))


def test_a_worker_of_another_model_is_refused_and_never_routed_to(two_by_two, tokenizer_dir, tmp_path, tiny_model):
    other = write_tiny_checkpoint(tmp_path / "other", tokenizer_dir, seed=1)  # the same shapes, other weights
    proc = subprocess.Popen([sys.executable, "-m", "llm_worker", "--model", str(other), "--dtype", "float32",
                             "--name", "llm-other", "--results", two_by_two.endpoints.results,
                             "--control", two_by_two.endpoints.control], cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while two_by_two.health.get("llm-other", Health("llm")).state != "refused":
            assert time.monotonic() < deadline and proc.poll() is None
            two_by_two.receive(timeout_s=0.2)
        assert "serves model" in two_by_two.health["llm-other"].reason
        prompter = Prompter(tiny_model, two_by_two.context_len)
        requests = [prompter.request(*request(**CASES["text only"])) for _ in range(6)]
        for r, result in answers(two_by_two, requests, in_flight=6):
            assert r.llm != "llm-other" and "token_ids" in result
    finally:
        proc.kill()
        proc.wait()


def test_killing_one_of_two_visual_workers_loses_only_what_it_held_and_it_serves_again(tiny_model):
    proc, url = start_server(tiny_model, "--visual-workers", "2")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        expected = ask(client, NORMAL)
        victim = next(p for p in psutil.Process(proc.pid).children() if "visual-1" in p.cmdline())

        def one():
            try:
                return ask(client, NORMAL)
            except openai.APIStatusError as e:
                return e

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(one) for _ in range(200)]
            while sum(f.done() for f in futures) < 20:  # both visual workers are busy
                time.sleep(0.05)
            victim.kill()
            assert sum(f.done() for f in futures) < 150
            outcomes = [f.result(timeout=120) for f in futures]
        failed = [o for o in outcomes if not isinstance(o, str)]
        assert all(o == expected for o in outcomes if isinstance(o, str))
        assert all(o.status_code == 503 and "the visual-1 worker died" in str(o) for o in failed), failed
        assert len(failed) <= 8  # at most what was in flight when it died
        deadline = time.monotonic() + 60
        while (workers := httpx.get(f"{url}/workers").json())["visual-1"]["restarts"] == 0 or \
                workers["visual-1"]["state"] != "ready":
            assert time.monotonic() < deadline, workers
            time.sleep(0.2)
        assert workers["visual-1"]["restarts"] == 1 and workers["visual-1"]["pid"] != victim.pid, workers
        served = workers["visual-1"]["served"]
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(lambda _: ask(client, NORMAL), range(8))) == [expected] * 8
        after = httpx.get(f"{url}/workers").json()
        assert after["visual-1"]["served"] > served, json.dumps(after)
    finally:
        stop_server(proc)
