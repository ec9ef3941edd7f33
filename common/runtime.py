"""What every worker process shares: command-line options for model, device and endpoints, and dying with its parent."""

import argparse
import ctypes
import os
import signal
import sys

import torch

from common.config import DTYPES, load_config


def worker_args(description: str, embeds_help: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", required=True, help="checkpoint directory in Hugging Face layout")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: the checkpoint's own dtype")
    p.add_argument("--embeds", required=True, help=embeds_help)
    p.add_argument("--results", required=True, help="front end's results endpoint to connect to")
    p.add_argument("--exit-with-parent", action="store_true", help="die when the launching process dies")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, every core)")
    return p


def set_threads(n: int | None) -> None:
    """Two workers on one host each wanting every core make both wait on each other's threads: a CPU op whose
    threads are not all scheduled stalls for milliseconds, so the launcher gives each worker its share."""
    if n is not None:
        if n < 1:
            sys.exit(f"--threads must be at least 1, got {n}")
        torch.set_num_threads(n)


def resolve_dtype(model_dir, name: str | None) -> torch.dtype:
    return DTYPES[name or load_config(model_dir).dtype]


def die_with_parent() -> None:
    """The kernel sends SIGTERM when the parent exits (Linux); elsewhere the worker loop checks getppid."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:
        sys.exit("parent already gone")
