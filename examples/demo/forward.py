"""One teacher-forced pass over a training batch: the answer tokens' log-probabilities over the full vocabulary, the
answer loss, and the auxiliary loss of every probe and taught head. The ViT runs once per image however many
questions ask about it."""

from dataclasses import dataclass

import torch

from examples.demo.batch import Batch
from examples.demo.model import IMAGE_PAD, PAD
from examples.demo.probes import POSITION_LAYER, Probes
from examples.demo.taught_heads import (COMPARE_LAYER, OPTION_LAYER, attention_loss, compare_head_masses,
                                        focus_head_masses, gather_head_masses, option_head_masses, question_head_masses)
from examples.demo.vocabulary import TaskVocabulary


@dataclass
class Outputs:
    """Over every answer token of the batch, example by example."""

    logits: torch.Tensor  # (answer tokens, task tokens)
    log_probs: torch.Tensor  # (answer tokens, task tokens), normalised over the full vocabulary
    targets: torch.Tensor  # (answer tokens,): each answer token's row in the task vocabulary
    answer_lengths: list[int]  # each example's answer tokens, to split the rows above by example
    auxiliary_loss: torch.Tensor  # (): the probes' and the taught heads' losses

    def answer_loss(self) -> torch.Tensor:
        """The mean over examples of each answer's mean token cross-entropy: every question weighs the same."""
        token_loss = -self.log_probs.gather(1, self.targets[:, None])[:, 0]
        return torch.stack([t.mean() for t in token_loss.split(self.answer_lengths)]).mean()


def forward(model, vocab: TaskVocabulary, probes: Probes, batch: Batch) -> Outputs:
    """Teacher forcing: every example's prompt and answer in one right-padded pass of the language model."""
    image_embeds = model.model.visual(batch.pixels, grid_thw=batch.grids).pooler_output  # (visual tokens, hidden)
    per_image = image_embeds.split((batch.grids.prod(-1) // 4).tolist())
    examples = batch.examples
    length = max(len(e.ids) for e in examples)
    input_ids = torch.full((len(examples), length), PAD)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for b, example in enumerate(examples):  # right padding
        input_ids[b, : len(example.ids)] = torch.tensor(example.ids)
        mask[b, : len(example.ids)] = 1
    is_image = input_ids == IMAGE_PAD
    embeds = vocab.table[vocab.rows(input_ids)]  # (B, L, hidden)
    embeds = embeds.masked_scatter(is_image[..., None], torch.cat([per_image[e.image] for e in examples]))
    example_grids = batch.grids[[e.image for e in examples]]
    positions, _ = model.model.get_rope_index(input_ids, is_image.int(), image_grid_thw=example_grids, attention_mask=mask)
    out = model.model.language_model(inputs_embeds=embeds, position_ids=positions, attention_mask=mask,
                                     output_hidden_states=True, output_attentions=True)
    image_hidden = visual_token_states(out.hidden_states[POSITION_LAYER], is_image, batch)
    aux = probes.cell_and_place_loss(image_embeds, image_hidden, batch.cell_labels, batch.grids)
    rows, cols, targets, masses = [], [], [], []
    character_hidden, same, option_hidden, right = [], [], [], []  # the text options' probes
    for b, example in enumerate(examples):
        start = example.answer_start  # the hidden state before each answer token predicts it
        rows += [b] * example.answer_length
        cols += range(start - 1, len(example.ids) - 1)
        targets += example.ids[start:]
        image_positions = is_image[b].nonzero()[:, 0]
        masses += focus_head_masses(out.attentions, b, example, image_positions)
        masses += question_head_masses(out.attentions, b, example)
        masses += option_head_masses(out.attentions, b, example)
        if example.character_matches:
            masses += compare_head_masses(out.attentions, b, example, image_positions)
            character_hidden.append(out.hidden_states[COMPARE_LAYER + 1][b, [m.position for m in example.character_matches]])
            same += [m.same for m in example.character_matches]
            masses += gather_head_masses(out.attentions, b, example)
            option_hidden.append(out.hidden_states[OPTION_LAYER][b, [option[-1].position for option in example.text_options]])
            right += [all(m.same for m in option) for option in example.text_options]
    if masses:
        aux = aux + attention_loss(masses)
    if same:
        aux = aux + probes.same_character_loss(torch.cat(character_hidden), same)
        aux = aux + probes.right_option_loss(torch.cat(option_hidden), right)
    logits, log_probs = vocab.log_probs(out.last_hidden_state[rows, cols])
    return Outputs(logits, log_probs, vocab.rows(torch.tensor(targets)), [e.answer_length for e in examples], aux)


def visual_token_states(hidden: torch.Tensor, is_image: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(B, L, hidden) -> (visual tokens, hidden): each image's visual tokens in the first example that shows it, images
    in order (as batch.cell_labels)."""
    first = {}
    for b, example in enumerate(batch.examples):
        first.setdefault(example.image, b)
    return torch.cat([hidden[first[i]][is_image[first[i]]] for i in range(len(batch.grids))])
