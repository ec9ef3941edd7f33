"""Linear probes, training only and not saved: each visual token's cell labels from the ViT's output, its row, column
and quarter of the image from the language model after POSITION_LAYER layers, and whether a text option's characters
match the box's. Dense targets that teach the towers to see the cells, to turn M-RoPE positions into coordinates and
to match options."""

import torch
from torch import nn

from examples.demo.tasks import CHARACTERS, COLOURS, KINDS, MAX_COUNT, QUARTERS, TEXT_LENGTH

CELL_LABELS = {"kind": len(KINDS) + 1, "colour": len(COLOURS) + 1, "span": 3, "anchor": 2, "count": MAX_COUNT + 1,
               "char": len(CHARACTERS) + 1, "place": TEXT_LENGTH + 1}  # classes of each cell label (Scene.cell_labels)
MAX_CELLS = 10  # rows or columns of the largest task image
PLACES = {"row": MAX_CELLS, "column": MAX_CELLS, "quarter": len(QUARTERS)}  # classes of each place probe
POSITION_LAYER = 2  # the language model's hidden state that the row, column and quarter probes read


def cell_places(grids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each visual token's row, column and quarter of its image: grids (images, 3) → PLACES → (visual tokens,)."""
    tokens = grids.prod(-1) // 4
    height, width = (grids[:, 1:] // 2).repeat_interleave(tokens, 0).T
    index = torch.cat([torch.arange(n) for n in tokens.tolist()])
    row, column = index // width, index % width
    return {"row": row, "column": column, "quarter": 2 * (2 * row >= height) + (2 * column >= width)}  # as QUARTERS


class Probes(nn.Module):
    """The probes of one model width, each a linear map from a hidden state to its classes."""

    def __init__(self, hidden: int):
        super().__init__()
        self.cells = nn.ModuleDict({name: nn.Linear(hidden, n) for name, n in CELL_LABELS.items()})
        self.position = nn.ModuleDict({name: nn.Linear(hidden, n) for name, n in PLACES.items()})
        self.same = nn.Linear(hidden, 2)  # a text option's character is the box's in its place (after the compare layer)
        self.right = nn.Linear(hidden, 2)  # a text option is the box's text (into the option layer, at its last character)

    def cell_and_place_loss(self, image_embeds, image_hidden, cell_labels, grids) -> torch.Tensor:
        """image_embeds, image_hidden: (visual tokens, hidden); cell_labels: (visual tokens, len(CELL_LABELS));
        grids: (images, 3). The mean of the cell and place probes' cross-entropies."""
        places = cell_places(grids)
        losses = [nn.functional.cross_entropy(head(image_embeds), cell_labels[:, k]) for k, head in enumerate(self.cells.values())]
        losses += [nn.functional.cross_entropy(head(image_hidden), places[name]) for name, head in self.position.items()]
        return torch.stack(losses).mean()

    def same_character_loss(self, hidden: torch.Tensor, same: list[bool]) -> torch.Tensor:
        """hidden: (option characters, hidden) after the compare layer; same: whether each is the box's character."""
        return nn.functional.cross_entropy(self.same(hidden), torch.tensor(same, dtype=torch.long))

    def right_option_loss(self, hidden: torch.Tensor, right: list[bool]) -> torch.Tensor:
        """hidden: (text options, hidden) into the option layer at each one's last character; right: whether each
        option is the box's text."""
        return nn.functional.cross_entropy(self.right(hidden), torch.tensor(right, dtype=torch.long))
