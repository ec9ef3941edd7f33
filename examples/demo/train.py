"""Trains the embedded demo model (examples/model/): a small Qwen2.5-VL (window attention, M-RoPE, the real
151,936-token vocabulary, tokenizer and chat template) on the synthetic tasks of examples.demo.tasks, on CPU, with
transformers' own modules; saves it in Hugging Face layout, bfloat16. This file owns the training loop, its command
line and validation.

    python -m examples.demo.train --out /tmp/stage1                   # from fresh weights
    python -m examples.demo.train --init /tmp/stage1 --seed 1 --lr 1e-3 --warmup 100 --out /tmp/stage2   # train on
    python -m examples.demo.train --steps 0 --out /tmp/random-model    # the same model untrained: a chance baseline

The shipped model's stages, steps and durations are in README, "Demo model"."""

import argparse
import math
import random
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from common.tokenizer import Tokenizer
from examples.demo.batch import Batch, sample_batch
from examples.demo.forward import forward
from examples.demo.model import PREPROCESS, TEXT, build_model, save
from examples.demo.probes import Probes
from examples.demo.prompts import TAGS
from examples.demo.vocabulary import TaskVocabulary, task_token_ids
from examples.tokenizer_files import build_qwen_tokenizer_files


@torch.no_grad()
def validate(model, vocab: TaskVocabulary, probes: Probes, batches: list[Batch]) -> dict[str, float]:
    """Per tag, the share of answers whose every token is the argmax under teacher forcing (over the full vocabulary:
    above the zero logit of the untrained tokens), which is exactly the share greedy decoding gets right."""
    model.eval()
    right, total = defaultdict(int), defaultdict(int)
    for batch in batches:
        outputs = forward(model, vocab, probes, batch)
        best = outputs.logits.max(-1)
        hits = ((best.indices == outputs.targets) & (best.values > 0)).split(outputs.answer_lengths)
        for example, hit in zip(batch.examples, hits):
            right[example.tag] += bool(hit.all())
            total[example.tag] += 1
    model.train()
    return {tag: right[tag] / total[tag] for tag in TAGS if total[tag]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=3000, help="0 saves the initial random weights")
    p.add_argument("--seed", type=int, default=0, help="weights and the stream of training tasks")
    p.add_argument("--init", type=Path, help="train on from the weights of this checkpoint instead of fresh ones")
    p.add_argument("--images", type=int, default=8, help="images per step")
    p.add_argument("--questions", type=int, default=6, help="questions per image per step")
    p.add_argument("--weight", action="append", default=[], metavar="TAG=W",
                   help="draw a tag's questions W times as often as the others', e.g. mcq-text=4 (validation is unweighted)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--aux-weight", type=float, default=1.0, help="weight of the auxiliary per-cell loss")
    p.add_argument("--eval-every", type=int, default=250, help="validate and save a checkpoint this often")
    args = p.parse_args()
    weights = {tag.replace("-", " "): float(w) for tag, w in (item.split("=") for item in args.weight)}
    if unknown := set(weights) - set(TAGS):
        p.error(f"unknown tags {sorted(unknown)}; tags are {[t.replace(' ', '-') for t in TAGS]}")

    model = build_model(args.seed, args.init).train()
    if args.steps == 0:
        save(model, args.out)
        return
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        build_qwen_tokenizer_files(tokenizer_dir)
        tokenizer = Tokenizer.from_dir(tokenizer_dir)
    vocab = TaskVocabulary(model.get_input_embeddings(), task_token_ids(tokenizer, args.seed), args.init is not None)
    rng, val_rng = random.Random(args.seed), random.Random(f"validation {args.seed}")
    val = [sample_batch(val_rng, tokenizer, PREPROCESS, 16, 8) for _ in range(4)]
    probes = Probes(TEXT["hidden_size"])  # drawn after the vocabulary's rows: one stream of weights
    params = [vocab.table, *(p for name, p in model.named_parameters() if "embed_tokens" not in name),
              *probes.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)

    def schedule(step: int) -> float:  # linear warmup, then a half cosine down to a tenth
        return min(1.0, (step + 1) / args.warmup) * (0.55 + 0.45 * math.cos(math.pi * step / args.steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    print(f"{sum(p.numel() for p in params):,} trained parameters ({len(vocab.ids)} task tokens); {args.steps} steps "
          f"of {args.images} images x {args.questions} questions; tag weights {weights or 'even'}", flush=True)
    start, cpu_start, window, losses = time.time(), time.process_time(), time.time(), []
    clock = lambda: f"{(time.time() - start) / 60:.1f} min, CPU {(time.process_time() - cpu_start) / 60:.1f} min"
    for step in range(args.steps):
        outputs = forward(model, vocab, probes, sample_batch(rng, tokenizer, PREPROCESS, args.images, args.questions, weights))
        answer = outputs.answer_loss()
        loss = answer + args.aux_weight * outputs.auxiliary_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append((answer.item(), outputs.auxiliary_loss.item()))
        if (step + 1) % 20 == 0:
            recent = losses[-20:]
            print(f"step {step + 1} loss {sum(a for a, _ in recent) / 20:.4f} aux {sum(x for _, x in recent) / 20:.4f} lr {scheduler.get_last_lr()[0]:.2e} "
                  f"{(time.time() - window) / 20:.2f} s/step", flush=True)
            window = time.time()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            scores = validate(model, vocab, probes, val)
            print(f"step {step + 1} validation " + " ".join(f"{t.replace(' ', '-')} {v:.2f}" for t, v in scores.items())
                  + f" ({clock()})", flush=True)
            vocab.write_into(model.get_input_embeddings())
            save(model, args.out)
    print(f"saved {args.out} after {args.steps} steps ({clock()})", flush=True)


if __name__ == "__main__":
    main()
