"""ZeroMQ CURVE on the sockets between the processes: a pipeline over tcp with keys gives transformers' tokens; a
socket without a key of the folder, or with a stranger's, cannot deliver anything; a worker's key cannot forge the
other worker's messages; a worker started without the key is never admitted."""

import subprocess
import sys
import time
import uuid

import pytest
import zmq

from common.messages import Finish, Heartbeat, TokenEntry, Tokens
from common.options import Options
from common.protocol import encode
from common.security import Curve, write_keys
from frontend.pipeline import Pipeline, collect
from frontend.prompt import Prompter
from tests.test_pipeline import CASES, ROOT, reference_tokens, request


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys") / "curve"
    write_keys(folder)
    return folder


@pytest.fixture(scope="module")
def secure(tiny_model, keys):
    """Both workers over tcp with CURVE on every socket."""
    pipeline = Pipeline(Options(model=tiny_model, dtype="float32", chunk_width=24, transport="tcp", curve_keys=keys))
    pipeline.start()
    pipeline.wait_ready()
    prompter = Prompter(tiny_model, pipeline.context_len)
    yield pipeline, prompter
    pipeline.close()


def test_keys_are_one_pair_a_role_readable_by_their_owner_only(keys):
    assert sorted(p.name for p in keys.iterdir()) == sorted(
        f"{role}.{ext}" for role in ("frontend", "visual", "llm") for ext in ("key", "key_secret"))
    assert keys.stat().st_mode & 0o777 == 0o700
    assert all((keys / f"{role}.key_secret").stat().st_mode & 0o777 == 0o600 for role in ("frontend", "visual", "llm"))


@pytest.mark.parametrize("case", ["small image", "two images", "text only"])
def test_a_curve_pipeline_over_tcp_gives_transformers_tokens(secure, reference, tiny_model, case):
    pipeline, prompter = secure
    assert pipeline.endpoints.results.startswith("tcp://")
    result = collect(pipeline, prompter.request(*request(**CASES[case])))
    assert result["token_ids"] == reference_tokens(reference, tiny_model, **CASES[case])


def forger(endpoint: str, curve: Curve | None = None) -> zmq.Socket:
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.IMMEDIATE, 1)  # a peer only once its handshake has completed
    if curve is not None:
        curve.connect_to(push, "frontend")
    push.connect(endpoint)
    return push


def nothing_arrives_from(pipeline: Pipeline, push: zmq.Socket, rid: str) -> None:
    """Tries to send forged results for `rid`: the handshake never completes, so the socket never has a peer to send
    to, and nothing reaches the pipeline's reader."""
    assert not push.poll(2000, zmq.POLLOUT)
    with pytest.raises(zmq.Again):
        push.send_multipart([b"llm-0", *encode(Tokens([TokenEntry(rid, [1], "forged")]))], flags=zmq.NOBLOCK)
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline:
        events = pipeline.receive(timeout_s=0.2) or []
        assert not [e for e in events if e.id == rid]


def test_a_socket_without_a_key_cannot_deliver(secure):
    pipeline, _ = secure
    push = forger(pipeline.endpoints.results)
    nothing_arrives_from(pipeline, push, uuid.uuid4().hex)
    push.close()


def test_a_strangers_key_is_refused(secure, tmp_path):
    pipeline, _ = secure
    write_keys(tmp_path / "other")
    push = forger(pipeline.endpoints.results, Curve(tmp_path / "other", "llm"))
    nothing_arrives_from(pipeline, push, uuid.uuid4().hex)
    push.close()


def test_the_visual_workers_key_cannot_send_the_llm_workers_messages(secure, keys):
    pipeline, _ = secure
    push = forger(pipeline.endpoints.results, Curve(keys, "visual"))
    dropped = pipeline.dropped
    rid = uuid.uuid4().hex
    push.send_multipart([b"llm-0", *encode(Finish(rid, "stop", 1, 1))])  # in an LLM worker's name
    push.send_multipart([b"llm-0", *encode(Heartbeat(1))])
    deadline = time.monotonic() + 5
    while pipeline.dropped < dropped + 2 and time.monotonic() < deadline:
        assert not [e for e in pipeline.receive(timeout_s=0.2) or [] if e.id == rid]
    assert pipeline.dropped == dropped + 2
    push.close()


def test_a_worker_started_without_the_key_is_never_admitted(secure, tiny_model):
    pipeline, _ = secure
    proc = subprocess.Popen([sys.executable, "-m", "llm_worker", "--model", str(tiny_model), "--dtype", "float32",
                             "--name", "llm-intruder", "--results", pipeline.endpoints.results, "--control",
                             pipeline.endpoints.control], cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            pipeline.receive(timeout_s=0.2)
            assert "llm-intruder" not in pipeline.health  # its heartbeats never get through
        assert proc.poll() is None  # it runs, unheard
    finally:
        proc.kill()
        proc.wait()
