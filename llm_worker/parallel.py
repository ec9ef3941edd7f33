"""Tensor parallelism for the LLM worker (`--tp K`): K ranks, one process each, joined by torch.distributed (gloo on
CPU, nccl on CUDA). Rank 0 is the worker the front end sees; it starts ranks 1..K-1 (its followers) itself.

The split is Megatron's: q/k/v and gate/up are column-parallel (rank r holds query heads, KV heads and intermediate
channels r/K..(r+1)/K), o_proj and down_proj row-parallel, each followed by an all-reduce (sum) of its output: two
all-reduces per layer. Each rank's KV cache holds its own KV heads. Embeddings, norms and the LM head are replicated:
every rank computes full logits from the full hidden state and rank 0 alone samples, so nothing is gathered.

Step inputs: rank 0 runs the engine. Before each forward it broadcasts a header (what, sizes, first row), one int64
tensor (positions, slots, logits_at) and the embeddings; each follower runs the same forward on the same tensors, so
the ranks' all-reduces meet in order. A new cache and each cache row move are broadcast the same way."""

import multiprocessing
import multiprocessing.connection
import os
import socket
import sys
import threading
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from common.config import TextConfig, load_config
from common.options import Options
from common.runtime import die_with_parent, resolve_dtype
from llm_worker.model import KVCache, LanguageModel
from llm_worker.quant import QUANTIZED_KINDS

NEW_CACHE, FORWARD, MOVE_ROW, STOP = range(4)
HEADER = 7  # int64s: the op, then its fields
EMBED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IDLE_TIMEOUT = timedelta(days=365)  # a follower waits in a broadcast for as long as rank 0 has no work


def check_divisible(config: TextConfig, tp: int) -> None:
    """A ValueError naming what does not divide by tp, and the values of --tp that would do."""
    sizes = {"attention heads": config.num_attention_heads, "KV heads": config.num_key_value_heads,
             "intermediate size": config.intermediate_size}
    bad = [f"{name} {n}" for name, n in sizes.items() if n % tp]
    if bad:
        fits = [k for k in range(1, config.num_key_value_heads + 1) if all(n % k == 0 for n in sizes.values())]
        raise ValueError(f"--tp {tp} must divide the model's attention heads, KV heads and intermediate size; "
                         f"{', '.join(bad)} do not divide by {tp} (--tp may be {', '.join(map(str, fits))})")


def check_options(options: Options) -> None:
    """What --tp needs of the model and the other options, checked before any rank starts."""
    check_divisible(load_config(options.model).text, options.tp)
    if options.tp > 1 and options.quantization is not None:
        raise ValueError(f"--quantization {options.quantization} is not supported with --tp above 1 yet")


def rank_device(device: str, rank: int) -> str:
    """cpu for every rank; cuda:N → cuda:N+rank."""
    d = torch.device(device)
    return "cpu" if d.type == "cpu" else f"{d.type}:{(d.index or 0) + rank}"


def join_group(rank: int, tp: int, port: int, device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=tp,
                            timeout=IDLE_TIMEOUT)


def shard_tensors(model: LanguageModel, tensors: dict[str, Tensor], rank: int, tp: int) -> None:
    """Replaces the stacked projections' tensors by this rank's slices and resizes the (meta) modules to them; the
    row-parallel ones get their all-reduce as a forward hook, so model.py stays the single-device model."""
    if any(name.rsplit(".", 1)[-1] in QUANTIZED_KINDS for name in tensors):
        raise ValueError("--tp above 1 takes float weights (float32, bfloat16, float16): quantized weights "
                         "(--quantization, AWQ checkpoints) are not supported with tensor parallelism yet")
    hidden = model.config.hidden_size
    for i, layer in enumerate(model.model.layers):
        attn, mlp, prefix = layer.self_attn, layer.mlp, f"model.layers.{i}."
        for owner, stacked, reduced in ((attn, "self_attn.qkv_proj", "self_attn.o_proj"),
                                        (mlp, "mlp.gate_up_proj", "mlp.down_proj")):
            for kind in ("weight", "bias"):
                if (name := f"{prefix}{stacked}.{kind}") in tensors:  # each stacked part split by heads / channels
                    tensors[name] = torch.cat([part.chunk(tp)[rank] for part in tensors[name].split(owner.widths)])
            name = f"{prefix}{reduced}.weight"
            tensors[name] = tensors[name].chunk(tp, dim=1)[rank].contiguous()  # (C, in/tp): its input channels
            owner.widths = [w // tp for w in owner.widths]
        attn.n_head, attn.n_kv = attn.n_head // tp, attn.n_kv // tp
        with torch.device("meta"):
            attn.qkv_proj = nn.Linear(hidden, sum(attn.widths))
            attn.o_proj = nn.Linear(attn.n_head * attn.head_dim, hidden, bias=False)
            mlp.gate_up_proj = nn.Linear(hidden, sum(mlp.widths), bias=False)
            mlp.down_proj = nn.Linear(mlp.widths[0], hidden, bias=False)
        attn.o_proj.register_forward_hook(all_reduce_output)
        mlp.down_proj.register_forward_hook(all_reduce_output)


def all_reduce_output(_module, _inputs, output: Tensor) -> None:
    dist.all_reduce(output)  # in place: the hook returns None, so the module's output is the sum over the ranks


def load_shard(options: Options, device: str, rank: int) -> LanguageModel:
    return LanguageModel.from_pretrained(options.model, resolve_dtype(options.model, options.dtype), device,
                                         options.quantization, shard=lambda m, t: shard_tensors(m, t, rank, options.tp))


def broadcast_header(device, *fields: int) -> None:
    dist.broadcast(torch.tensor([*fields, *[0] * (HEADER - len(fields))], device=device), 0)


def split_ints(ints: Tensor, B: int, S: int, has_logits_at: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """The int64 tensor broadcast with a forward → positions (3, B, S), slots (B, S), logits_at (B,) or None."""
    positions, slots = ints[: 3 * B * S].view(3, B, S), ints[3 * B * S : 4 * B * S].view(B, S)
    return positions, slots, ints[4 * B * S :] if has_logits_at else None


def run_in_step(model: LanguageModel, *inputs) -> Tensor:
    """A forward whose inputs every rank has: one that fails on one rank leaves the others waiting in an all-reduce
    that will never match, so the process exits (rank 0 then, with its followers; the front end restarts it)."""
    try:
        return model(*inputs)
    except Exception as e:
        print(f"llm worker: rank {dist.get_rank()}: a tensor-parallel forward failed: {e!r}", file=sys.stderr,
              flush=True)
        os._exit(1)


class LeaderCache:
    """Rank 0's KV cache: its row moves are broadcast to the followers first."""

    def __init__(self, cache: KVCache, device):
        self.local, self.device = cache, device

    def move_row(self, src: int, dst: int) -> None:
        broadcast_header(self.device, MOVE_ROW, src, dst)
        self.local.move_row(src, dst)


class Leader:
    """Rank 0's model, as the engine uses it (new_cache, __call__, embed, device, dtype): every forward and cache
    change is broadcast to the followers before it runs here. One cache at a time (the engine's)."""

    def __init__(self, model: LanguageModel, followers: list):
        self.model, self.followers, self.closing = model, followers, False
        threading.Thread(target=self.watch, name="tp-followers", daemon=True).start()

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def embed(self, ids: Tensor) -> Tensor:
        return self.model.embed(ids)

    def new_cache(self, batch: int, max_len: int) -> LeaderCache:
        broadcast_header(self.device, NEW_CACHE, batch, max_len)
        return LeaderCache(self.model.new_cache(batch, max_len), self.device)

    def __call__(self, embeds: Tensor, positions: Tensor, slots: Tensor, cache: LeaderCache,
                 logits_at: Tensor | None = None, first_row: int = 0) -> Tensor:
        B, S, C = embeds.shape
        parts = [positions.reshape(-1), slots.reshape(-1), *([] if logits_at is None else [logits_at])]
        ints = torch.cat([p.to(self.device, torch.int64) for p in parts])
        embeds = embeds.contiguous()
        broadcast_header(self.device, FORWARD, B, S, C, first_row, logits_at is not None,
                         EMBED_DTYPES.index(embeds.dtype))
        dist.broadcast(ints, 0)
        dist.broadcast(embeds, 0)
        positions, slots, logits_at = split_ints(ints, B, S, logits_at is not None)  # what the followers use
        return run_in_step(self.model, embeds, positions, slots, cache.local, logits_at, first_row)

    def watch(self) -> None:
        """A follower that dies takes rank 0 with it: the front end sees one worker die and restarts it whole."""
        while not self.closing:
            ended = multiprocessing.connection.wait([p.sentinel for p in self.followers], timeout=1.0)
            if ended and not self.closing:
                dead = [p for p in self.followers if p.sentinel in ended]
                for p in dead:
                    p.join()  # its exit code
                names = ", ".join(f"{p.name} (exit code {p.exitcode})" for p in dead)
                print(f"llm worker: tensor-parallel follower died: {names}", file=sys.stderr, flush=True)
                os._exit(1)

    def close(self) -> None:
        """Stops the followers and leaves the process group (the worker itself just dies; its followers with it)."""
        self.closing = True
        broadcast_header(self.device, STOP)
        for p in self.followers:
            p.join()
        dist.destroy_process_group()


def launch(options: Options, device: str) -> Leader:
    """Starts ranks 1..tp-1 as child processes of this one (which dies → they die), joins the group as rank 0 and
    loads this rank's shard. The CPU threads this process has are split among the ranks."""
    check_options(options)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = max(1, torch.get_num_threads() // options.tp)
    torch.set_num_threads(threads)
    spawn = multiprocessing.get_context("spawn")
    followers = [spawn.Process(target=follow, args=(options, device, rank, port, threads, os.getpid()),
                               name=f"tp-rank-{rank}", daemon=True) for rank in range(1, options.tp)]
    for p in followers:
        p.start()
    join_group(0, options.tp, port, rank_device(device, 0))
    return Leader(load_shard(options, rank_device(device, 0), 0), followers)


@torch.inference_mode()
def follow(options: Options, device: str, rank: int, port: int, threads: int, leader: int) -> None:
    """A follower rank: runs whatever rank 0 broadcasts, on its own shard and cache, until STOP."""
    die_with_parent()
    if os.getppid() != leader:  # rank 0 died before the line above: nobody will ever join the group
        sys.exit("rank 0 is gone")
    torch.set_num_threads(threads)
    device = rank_device(device, rank)
    join_group(rank, options.tp, port, device)
    model = load_shard(options, device, rank)
    cache = None
    while True:
        header = torch.empty(HEADER, dtype=torch.int64, device=device)
        dist.broadcast(header, 0)
        op, *fields = header.tolist()
        if op == NEW_CACHE:
            cache = None  # the old one's memory first
            cache = model.new_cache(fields[0], fields[1])
        elif op == MOVE_ROW:
            cache.move_row(fields[0], fields[1])
        elif op == FORWARD:
            B, S, C, first_row, has_logits_at, dtype = fields
            ints = torch.empty(4 * B * S + (B if has_logits_at else 0), dtype=torch.int64, device=device)
            embeds = torch.empty(B, S, C, dtype=EMBED_DTYPES[dtype], device=device)
            dist.broadcast(ints, 0)
            dist.broadcast(embeds, 0)
            positions, slots, logits_at = split_ints(ints, B, S, bool(has_logits_at))
            run_in_step(model, embeds, positions, slots, cache, logits_at, first_row)
        elif op == STOP:
            dist.destroy_process_group()
            return
