"""Trains the embedded demo model (examples/model/): a small Qwen2.5-VL (window attention, M-RoPE, the real
151,936-token vocabulary, tokenizer and chat template) on the synthetic tasks of examples.demo.tasks, on CPU, with
transformers' own modules; saves it in Hugging Face layout, bfloat16.

    python -m examples.demo.train --out /tmp/stage1                   # from fresh weights
    python -m examples.demo.train --init /tmp/stage1 --seed 1 --lr 1e-3 --warmup 100 --out /tmp/stage2   # train on
    python -m examples.demo.train --steps 0 --out /tmp/random-model    # the same model untrained: a chance baseline

The shipped model's stages, steps and durations are in README, "Demo model"."""

import argparse
import copy
import json
import math
import random
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from common.tokenizer import Tokenizer
from examples.tokenizer_files import build_qwen_tokenizer_files
from examples.demo.tasks import (CELL, CHARACTERS, COLOURS, KINDS, MAX_COUNT, OPEN_CATEGORIES, PLURALS, QUARTERS,
                                 TEXT_LENGTH, choice_questions, counted, make_scene, open_questions)
from frontend.eval import mcq_prompt
from visual_worker.preprocess import PreprocessConfig, preprocess_images

IM_END, PAD, IMAGE_PAD = 151645, 151643, 151655
PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
    "min_pixels": 224 * 224, "max_pixels": 280 * 280,  # any image is seen at the scale of the task images
    "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
}
TEXT = dict(
    vocab_size=151936, hidden_size=64,  # 151936 x 64 bf16 = 19.4 MB, tied: the bulk of the checkpoint
    intermediate_size=256, num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-6,
    # head_dim 32: 16 rotary frequencies from 1 down to 0.003 (theta 500); time takes the 2 fastest, rows the next
    # 3 (0.46-0.21 rad a cell), columns the other 11 (0.14 down to 0.003). A column or row turns enough to be told
    # from its neighbours, and the slowest column frequencies barely turn across a prompt, so an answer can find an
    # image token by its content however far back it is. (At Qwen's theta 1e6, columns would barely turn at all;
    # at a small theta every frequency would turn too fast to match content across a long prompt.)
    rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 11], "rope_theta": 500.0},
    tie_word_embeddings=True, bos_token_id=151643, eos_token_id=IM_END,
)
VISION = dict(
    depth=4, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=64,
    fullatt_block_indexes=[1, 3], window_size=112, tokens_per_second=2,  # blocks 0 and 2 attend within windows
)
TAGS = [f"open {c}" for c in OPEN_CATEGORIES] + ["mcq colour", "mcq count", "mcq text", "mcq position"]
SCENE_CATEGORIES = ("colour", "count", "text", "grounding", "position")
AUX = {"kind": len(KINDS) + 1, "colour": len(COLOURS) + 1, "span": 3, "anchor": 2, "count": MAX_COUNT + 1,
       "char": len(CHARACTERS) + 1, "place": TEXT_LENGTH + 1}  # classes of each cell label (Scene.cell_labels)
MAX_CELLS = 10  # rows or columns of the largest task image
PLACES = {"row": MAX_CELLS, "column": MAX_CELLS, "quarter": len(QUARTERS)}  # classes of each place probe
POSITION_LAYER = 2  # the language model's hidden state that the row and column probes read
QUESTION_LAYER = 1  # the language model layer whose first head is taught to read the question's colour and kind words
FOCUS_LAYER = 3  # the language model layer whose first head is taught where each answer is to be read
COMPARE_LAYER = 2  # the layer whose first head is taught, at each character of a text option, to read the box's
# character in the same place; a probe on its output asks whether the two are the same character
GATHER_LAYER = 4  # the layer whose first head is taught, at a text option's last character, to read the option's
# three characters: a probe on the input of OPTION_LAYER asks there whether all three match, which the option head
# can look for
OPTION_LAYER = 5  # and the layer whose first head is taught which option of a multiple-choice prompt is right

# A task word's embedding is drawn at std EMBED_STD so that it stays visible in its residual stream: at INIT_STD the
# first layer's output drowns it, no answer can read the question, and only question-blind answers are learned.
EMBED_STD = 1.0
INIT_STD = 0.05  # transformers' 0.02 is made for wide models: at width 64 the image barely moves the answer at first


def build_model(seed: int, init: Path | None = None) -> Qwen2_5_VLForConditionalGeneration:
    """Fresh weights from `seed`, or the weights of the checkpoint `init` (to train on from a saved step)."""
    torch.manual_seed(seed)
    if init is not None:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
    else:
        config = Qwen2_5_VLConfig(text_config={**TEXT, "initializer_range": INIT_STD}, tie_word_embeddings=True,
                                  vision_config={**VISION, "initializer_range": INIT_STD}, initializer_range=INIT_STD)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.set_attn_implementation("eager")  # training reads the attention weights (the focus loss)
    return model


def chat_text(tokenizer: Tokenizer, prompt: str) -> str:
    """The chat template over one image and `prompt`, default system prompt, one image pad."""
    return tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}])


def chat_ids(tokenizer: Tokenizer, grid: list[int], text: str) -> list[int]:
    """The ids of chat_text(…) exactly as the visual worker builds them: pads expanded."""
    return tokenizer.expand_vision_pads(tokenizer.encode(text), [grid], [])


def span_positions(tokenizer: Tokenizer, grid: list[int], text: str, start: int, end: int) -> list[int]:
    """Where text[start:end] (from a word boundary of the tokenizer to another) sits in the ids of the chat text
    `text` once its image pad is expanded."""
    first, last = len(tokenizer.encode(text[:start])), len(tokenizer.encode(text[:end]))
    shift = math.prod(grid) // 4 - 1  # the image pad before them expands to one pad a visual token
    return list(range(first + shift, last + shift))


def option_positions(tokenizer: Tokenizer, grid: list[int], text: str, letter: str, option: str) -> list[int]:
    """Where the text of option `letter` sits in chat_ids(tokenizer, grid, text)."""
    start = text.index(f"\n{letter}. {option}\n") + 3  # the space before the option
    return span_positions(tokenizer, grid, text, start, start + 1 + len(option))


KEY_WORDS = re.compile(r" (" + "|".join([*COLOURS, *PLURALS.values(), *KINDS]) + r")\b")


def key_positions(tokenizer: Tokenizer, grid: list[int], text: str, question: str) -> list[int]:
    """Where the colour and kind words of `question` sit in chat_ids(tokenizer, grid, text) (none for the text)."""
    at = text.index(question)
    return [p for m in KEY_WORDS.finditer(question) for p in span_positions(tokenizer, grid, text, at + m.start(), at + m.end())]


def scene_questions(scene, rng: random.Random, category: str) -> dict[str, list[tuple[str, str, str, tuple, str | None]]]:
    """(prompt, question, answer, cells the answer is read from, the options A-D or None) the scene answers, by tag.
    A scene made for counting is asked only its `counted` question, as in the held-out rows."""
    asked = lambda q: q.category != "count" or category != "count" or q.question == counted(scene)
    out = defaultdict(list)
    for q in filter(asked, open_questions(scene)):
        out[f"open {q.category}"].append((q.question, q.question, q.answer, q.cells, None))
    for c in filter(asked, choice_questions(scene, rng)):
        prompt = mcq_prompt(c.question, c.hint, dict(zip("ABCD", c.options)))
        out[f"mcq {c.category}"].append((prompt, c.question, c.answer, c.cells, c.options))
    return out


def sample_batch(rng: random.Random, tokenizer: Tokenizer, preprocess: PreprocessConfig, images: int, per_image: int,
                 weights: dict[str, float] | None = None):
    """`images` scenes, each made for a category drawn at random, and `per_image` questions about each, tags drawn
    from those the scene answers (evenly, or in proportion to `weights`, 1 for a tag not named). Returns
    pixel_values, grids, the cells' labels (visual tokens, len(AUX)) and [(image index, ids, answer length, tag,
    focus, keys, option, compare)]: focus is the visual tokens each answer token is read from, keys the positions
    of the question's colour and kind words, option the positions of the right option's text in a multiple-choice
    prompt, compare (position, visual token, same) triples, three an option in option order: each character of a
    text option, the box's character in the same place, and whether the two are the same."""
    scenes, rows = [], []
    for i in range(images):
        category = rng.choice(SCENE_CATEGORIES)
        scenes.append(make_scene(rng, category))
        pool = scene_questions(scenes[-1], rng, category)
        tags = sorted(pool)
        drawn = rng.choices(tags, [(weights or {}).get(t, 1.0) for t in tags], k=per_image)
        rows += [(i, tag, *rng.choice(pool[tag])) for tag in drawn]
    pixels, grids = preprocess_images([scene.draw() for scene in scenes], preprocess)
    labels = torch.cat([torch.tensor([scene.cell_labels()[name] for name in AUX]).T for scene in scenes])
    seqs = []
    for i, tag, prompt, question, answer, cells, options in rows:
        target = tokenizer.encode(answer) + [IM_END]
        tokens = [r * (scenes[i].size[0] // CELL) + c for c, r in cells]
        if tag == "open text":  # each character from its own cell, the end from all three
            focus = [[t] for t in tokens] + [tokens] * (len(target) - len(tokens))
        else:
            focus = [tokens] * len(target)
        grid, text = grids[i].tolist(), chat_text(tokenizer, prompt)
        keys = key_positions(tokenizer, grid, text, question)
        option, compare = [], []
        if options is not None:
            right = options["ABCD".index(answer)]
            option = option_positions(tokenizer, grid, text, answer, right)
        if tag == "mcq text":
            for letter, choice in zip("ABCD", options):
                at = option_positions(tokenizer, grid, text, letter, choice)[-TEXT_LENGTH:]  # a space before a digit is a token
                compare += zip(at, tokens, [a == b for a, b in zip(choice, right)], strict=True)
        seqs.append((i, chat_ids(tokenizer, grid, text) + target, len(target), tag, focus, keys, option, compare))
    return torch.from_numpy(pixels), torch.from_numpy(grids), labels, seqs


def task_token_ids(tokenizer: Tokenizer, seed: int, scenes: int = 3000) -> list[int]:
    """Every token the task prompts and answers use, gathered from many scenes; a batch with any other fails loudly."""
    rng, ids = random.Random(f"vocabulary {seed}"), {PAD}
    for _ in range(scenes):
        category = rng.choice(SCENE_CATEGORIES)
        for pairs in scene_questions(make_scene(rng, category), rng, category).values():
            for prompt, _, answer, *_ in pairs:
                ids.update(chat_ids(tokenizer, [1, 2, 2], chat_text(tokenizer, prompt)), tokenizer.encode(answer), [IM_END])
    return sorted(ids)


class TaskVocabulary(nn.Module):
    """The tied embedding as training sees it: rows for the tokens the tasks use are trained, every other row stays
    zero, so its logit is exactly 0 and the full 151,936-way softmax needs only one log(count) term for all of them.
    That is the same loss as a full-vocabulary softmax over the saved matrix, at the cost of a few hundred rows."""

    def __init__(self, embedding: nn.Embedding, ids: list[int], trained: bool):
        super().__init__()
        self.ids = torch.tensor(ids)
        self.index = torch.full((embedding.num_embeddings,), -1)
        self.index[self.ids] = torch.arange(len(ids))
        fresh = torch.randn(len(ids), embedding.embedding_dim) * EMBED_STD  # drawn either way: one stream of weights
        self.table = nn.Parameter(embedding.weight[self.ids].detach().clone() if trained else fresh)  # (task tokens, hidden)
        self.log_zero_mass = math.log(embedding.num_embeddings - len(ids))

    def rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        rows = self.index[token_ids]
        if (rows < 0).any():
            raise ValueError(f"token ids {sorted(set(token_ids[rows < 0].tolist()))} are not in the task vocabulary")
        return rows

    def log_probs(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, hidden) -> logits and log-probabilities over the full vocabulary, for the task tokens: (n, task tokens)."""
        logits = hidden @ self.table.T
        log_norm = torch.logaddexp(torch.logsumexp(logits, -1), torch.tensor(self.log_zero_mass))
        return logits, logits - log_norm[:, None]

    def write_into(self, embedding: nn.Embedding) -> None:
        with torch.no_grad():
            embedding.weight.zero_()
            embedding.weight[self.ids] = self.table


class AuxiliaryHeads(nn.Module):
    """Linear probes that read each visual token's cell labels from the ViT's output, its row, column and quarter of
    the image from the language model's hidden state after POSITION_LAYER layers, and whether a text option's
    characters match the box (`same`, `right`; used in forward). Training only: dense targets that teach the towers
    to see the cells, to turn M-RoPE positions into coordinates and to match options; not saved."""

    def __init__(self, hidden: int):
        super().__init__()
        self.cells = nn.ModuleDict({name: nn.Linear(hidden, n) for name, n in AUX.items()})
        self.position = nn.ModuleDict({name: nn.Linear(hidden, n) for name, n in PLACES.items()})
        self.same = nn.Linear(hidden, 2)  # a text option's character is the box's in its place (COMPARE_LAYER)
        self.right = nn.Linear(hidden, 2)  # a text option is the box's text (OPTION_LAYER, at its last character)

    def loss(self, image_embeds, image_hidden, labels, places: dict[str, torch.Tensor]) -> torch.Tensor:
        """image_embeds, image_hidden: (visual tokens, hidden); labels: (visual tokens, len(AUX)); places: PLACES →
        (visual tokens,). The mean of the probes' cross-entropies."""
        losses = [nn.functional.cross_entropy(head(image_embeds), labels[:, k]) for k, head in enumerate(self.cells.values())]
        losses += [nn.functional.cross_entropy(head(image_hidden), places[name]) for name, head in self.position.items()]
        return torch.stack(losses).mean()


def cell_places(grids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each visual token's row, column and quarter of its image: grids (images, 3) → PLACES → (visual tokens,)."""
    tokens = grids.prod(-1) // 4
    height, width = (grids[:, 1:] // 2).repeat_interleave(tokens, 0).T
    index = torch.cat([torch.arange(n) for n in tokens.tolist()])
    row, column = index // width, index % width
    return {"row": row, "column": column, "quarter": 2 * (2 * row >= height) + (2 * column >= width)}  # as QUARTERS


def forward(model, vocab: TaskVocabulary, heads: AuxiliaryHeads, pixels, grids, labels, seqs):
    """Teacher forcing: logits and log-probabilities at the answer positions, the answers' rows in the task vocabulary,
    how many answer tokens each sequence has, and the auxiliary loss. The ViT runs once per image however many
    questions ask about it."""
    image_embeds = model.model.visual(pixels, grid_thw=grids).pooler_output  # (visual tokens, hidden)
    tokens = (grids.prod(-1) // 4).tolist()
    per_image = image_embeds.split(tokens)
    length = max(len(ids) for _, ids, *_ in seqs)
    input_ids = torch.full((len(seqs), length), PAD)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for b, (_, ids, *_) in enumerate(seqs):  # right padding
        input_ids[b, : len(ids)] = torch.tensor(ids)
        mask[b, : len(ids)] = 1
    is_image = input_ids == IMAGE_PAD
    embeds = vocab.table[vocab.rows(input_ids)]  # (B, L, hidden)
    embeds = embeds.masked_scatter(is_image[..., None], torch.cat([per_image[i] for i, *_ in seqs]))
    seq_grids = grids[[i for i, *_ in seqs]]
    positions, _ = model.model.get_rope_index(input_ids, is_image.int(), image_grid_thw=seq_grids, attention_mask=mask)
    out = model.model.language_model(inputs_embeds=embeds, position_ids=positions, attention_mask=mask,
                                     output_hidden_states=True, output_attentions=True)
    first = {}  # each image's visual tokens in the first sequence that shows it
    for b, (i, *_) in enumerate(seqs):
        first.setdefault(i, b)
    image_hidden = torch.cat([out.hidden_states[POSITION_LAYER][first[i]][is_image[first[i]]] for i in range(len(tokens))])
    aux = heads.loss(image_embeds, image_hidden, labels, cell_places(grids))
    rows, cols, targets, masses = [], [], [], []
    attention = out.attentions[FOCUS_LAYER][:, 0]  # (B, L, L): the first head of the focus layer
    same_hidden, same, right_hidden, right = [], [], [], []  # the text options' probes
    for b, (_, ids, n, _, focus, keys, option, compare) in enumerate(seqs):
        start = len(ids) - n  # the hidden state before each answer token predicts it
        rows += [b] * n
        cols += range(start - 1, len(ids) - 1)
        targets += ids[start:]
        image_positions = is_image[b].nonzero()[:, 0]
        masses += [attention[b, start - 1 + k, image_positions[f]].sum() for k, f in enumerate(focus) if f]
        if keys:  # the question head, at every answer token, on the question's colour and kind words
            masses += list(out.attentions[QUESTION_LAYER][b, 0, start - 1: len(ids) - 1][:, keys].sum(-1))
        if option:  # and the option head, where the letter is given, on the right option's text
            masses.append(out.attentions[OPTION_LAYER][b, 0, start - 1, option].sum())
        if compare:  # and the compare head, at each character of a text option, on the box's character in its place
            at, cell, alike = map(list, zip(*compare))
            masses += list(out.attentions[COMPARE_LAYER][b, 0, at, image_positions[cell]])
            same_hidden.append(out.hidden_states[COMPARE_LAYER + 1][b, at])
            same += alike
            chars = [slice(k, k + TEXT_LENGTH) for k in range(0, len(at), TEXT_LENGTH)]  # each option's characters
            last = [at[c][-1] for c in chars]
            masses += [out.attentions[GATHER_LAYER][b, 0, q, at[c]].sum() for q, c in zip(last, chars)]  # the gather head
            right_hidden.append(out.hidden_states[OPTION_LAYER][b, last])
            right += [all(alike[c]) for c in chars]
    if masses:  # each taught head puts its attention where it was told to
        aux = aux + -torch.log(torch.stack(masses) + 1e-6).mean()
    if same:
        aux = aux + nn.functional.cross_entropy(heads.same(torch.cat(same_hidden)), torch.tensor(same, dtype=torch.long))
        aux = aux + nn.functional.cross_entropy(heads.right(torch.cat(right_hidden)), torch.tensor(right, dtype=torch.long))
    logits, log_probs = vocab.log_probs(out.last_hidden_state[rows, cols])
    return logits, log_probs, vocab.rows(torch.tensor(targets)), [n for _, _, n, *_ in seqs], aux


@torch.no_grad()
def validate(model, vocab: TaskVocabulary, heads: AuxiliaryHeads, batches) -> dict[str, float]:
    """Per tag, the share of answers whose every token is the argmax under teacher forcing (over the full vocabulary:
    above the zero logit of the untrained tokens), which is exactly the share greedy decoding gets right."""
    model.eval()
    right, total = defaultdict(int), defaultdict(int)
    for pixels, grids, labels, seqs in batches:
        logits, _, targets, counts, _ = forward(model, vocab, heads, pixels, grids, labels, seqs)
        best = logits.max(-1)
        hits = ((best.indices == targets) & (best.values > 0)).split(counts)
        for (_, _, _, tag, *_), hit in zip(seqs, hits):
            right[tag] += bool(hit.all())
            total[tag] += 1
    model.train()
    return {tag: right[tag] / total[tag] for tag in TAGS if total[tag]}


def save(model, out: Path) -> None:
    """The checkpoint in Hugging Face layout, bfloat16 (the model in training is left as it is)."""
    out.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(out)
    GenerationConfig(bos_token_id=151643, eos_token_id=[IM_END, 151643], do_sample=False).save_pretrained(out)
    build_qwen_tokenizer_files(out)
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")


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
    preprocess = PreprocessConfig(**{k: PREPROCESSOR[k] for k in ("min_pixels", "max_pixels")})
    vocab = TaskVocabulary(model.get_input_embeddings(), task_token_ids(tokenizer, args.seed), args.init is not None)
    rng, val_rng = random.Random(args.seed), random.Random(f"validation {args.seed}")
    val = [sample_batch(val_rng, tokenizer, preprocess, 16, 8) for _ in range(4)]
    heads = AuxiliaryHeads(TEXT["hidden_size"])
    params = [vocab.table, *(p for name, p in model.named_parameters() if "embed_tokens" not in name),
              *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)

    def schedule(step: int) -> float:  # linear warmup, then a half cosine down to a tenth
        return min(1.0, (step + 1) / args.warmup) * (0.55 + 0.45 * math.cos(math.pi * step / args.steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    print(f"{sum(p.numel() for p in params):,} trained parameters ({len(vocab.ids)} task tokens); {args.steps} steps "
          f"of {args.images} images x {args.questions} questions; tag weights {weights or 'even'}", flush=True)
    start, cpu_start, window, losses = time.time(), time.process_time(), time.time(), []
    clock = lambda: f"{(time.time() - start) / 60:.1f} min, CPU {(time.process_time() - cpu_start) / 60:.1f} min"
    for step in range(args.steps):
        batch = sample_batch(rng, tokenizer, preprocess, args.images, args.questions, weights)
        _, log_probs, targets, counts, aux = forward(model, vocab, heads, *batch)
        token_loss = -log_probs.gather(1, targets[:, None])[:, 0]
        answer = torch.stack([t.mean() for t in token_loss.split(counts)]).mean()  # every question weighs the same
        loss = answer + args.aux_weight * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append((answer.item(), aux.item()))
        if (step + 1) % 20 == 0:
            recent = losses[-20:]
            print(f"step {step + 1} loss {sum(a for a, _ in recent) / 20:.4f} aux {sum(x for _, x in recent) / 20:.4f} lr {scheduler.get_last_lr()[0]:.2e} "
                  f"{(time.time() - window) / 20:.2f} s/step", flush=True)
            window = time.time()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            scores = validate(model, vocab, heads, val)
            print(f"step {step + 1} validation " + " ".join(f"{t.replace(' ', '-')} {v:.2f}" for t, v in scores.items())
                  + f" ({clock()})", flush=True)
            vocab.write_into(model.get_input_embeddings())
            save(model, args.out)
    print(f"saved {args.out} after {args.steps} steps ({clock()})", flush=True)


if __name__ == "__main__":
    main()
