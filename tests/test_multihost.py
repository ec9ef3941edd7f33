"""Workers started by hand join a front end that started none: on this host over tcp, and across three network
namespaces (front end, visual worker, LLM worker each with its own interface on a bridge) with CURVE on every
socket; the answers are the ones a pipeline of its own gives."""

import json
import os
import socket
import subprocess
import sys
import uuid
from contextlib import contextmanager

import pytest

from common.security import write_keys
from tests.test_pipeline import ROOT, image_file  # noqa: F401 (a fixture)

PROMPT = "What is in the picture?"


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def launch(model, image, *extra, prefix=()) -> subprocess.Popen:
    return subprocess.Popen([*prefix, sys.executable, "launch.py", "--model", str(model), "--dtype", "float32",
                             "--image", str(image), "--prompt", PROMPT, "--max-new-tokens", "12", "--json", *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def worker(role: str, model, *extra, prefix=()) -> subprocess.Popen:
    return subprocess.Popen([*prefix, sys.executable, "-m", f"{role}_worker", "--model", str(model), "--dtype",
                             "float32", "--name", f"{role}-0", *extra], cwd=ROOT)


def answer(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def alone(tiny_model, image_file) -> dict:
    """The answer of a pipeline that starts its own workers."""
    return answer(launch(tiny_model, image_file))


def stop(*procs) -> None:
    for p in procs:
        p.kill()
        p.wait()


def test_workers_started_by_hand_join_a_front_end_on_this_host(tiny_model, image_file, alone):
    requests, results, control, embeds = free_ports(4)
    front = launch(tiny_model, image_file, "--visual-workers", "0", "--llm-workers", "0", "--transport", "tcp",
                   "--frontend-ports", f"{requests},{results},{control}")
    at = ["--results", f"tcp://127.0.0.1:{results}", "--control", f"tcp://127.0.0.1:{control}"]
    visual = worker("visual", tiny_model, "--requests", f"tcp://127.0.0.1:{requests}", "--embeds",
                    f"tcp://127.0.0.1:{embeds}", *at)
    llm = worker("llm", tiny_model, *at)
    try:
        assert answer(front)["token_ids"] == alone["token_ids"]
    finally:
        stop(front, visual, llm)


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@contextmanager
def namespaces(names: list[str]):
    """One network namespace per name, each with a veth interface 10.77.0.(i+1)/24 on a bridge that lives in a
    namespace of its own; → {name: address}."""
    tag = uuid.uuid4().hex[:4]
    bridge = f"qvl{tag}br"
    sh("ip", "netns", "add", bridge)
    made = [bridge]
    try:
        sh("ip", "netns", "exec", bridge, "ip", "link", "add", "br0", "type", "bridge")
        sh("ip", "netns", "exec", bridge, "ip", "link", "set", "br0", "up")
        addresses = {}
        for i, name in enumerate(names):
            ns, inside, outside = f"qvl{tag}{name}", f"v{tag}{i}", f"b{tag}{i}"
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "link", "add", inside, "type", "veth", "peer", "name", outside)
            sh("ip", "link", "set", inside, "netns", ns)
            sh("ip", "link", "set", outside, "netns", bridge)
            sh("ip", "netns", "exec", bridge, "ip", "link", "set", outside, "master", "br0", "up")
            addresses[name] = f"10.77.0.{i + 1}"
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{addresses[name]}/24", "dev", inside)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", inside, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield {name: (f"qvl{tag}{name}", address) for name, address in addresses.items()}
    finally:
        for ns in reversed(made):  # deleting a namespace deletes its ends of the veth pairs
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)")
def test_front_end_and_workers_on_three_hosts_with_curve_give_the_same_answer(tiny_model, image_file, alone,
                                                                                tmp_path):
    keys = tmp_path / "keys"
    write_keys(keys)
    curve = ["--curve-keys", str(keys)]
    with namespaces(["front", "visual", "llm"]) as hosts:
        (front_ns, front_ip), (visual_ns, visual_ip), (llm_ns, _) = hosts["front"], hosts["visual"], hosts["llm"]
        front = launch(tiny_model, image_file, "--visual-workers", "0", "--llm-workers", "0", "--transport", "tcp",
                       "--frontend-host", front_ip, "--frontend-ports", "5555,5557,5558", *curve,
                       prefix=("ip", "netns", "exec", front_ns))
        at = ["--results", f"tcp://{front_ip}:5557", "--control", f"tcp://{front_ip}:5558", *curve]
        visual = worker("visual", tiny_model, "--requests", f"tcp://{front_ip}:5555", "--embeds",
                        f"tcp://{visual_ip}:5556", *at, prefix=("ip", "netns", "exec", visual_ns))
        llm = worker("llm", tiny_model, *at, prefix=("ip", "netns", "exec", llm_ns))
        try:
            assert answer(front)["token_ids"] == alone["token_ids"]
        finally:
            stop(front, visual, llm)
