"""Item representation shared by every model: id embedding plus item side features."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ItemFeatures:
    """Side features per dense item id (row 0 is padding). Empty arrays when the data has none."""

    genres: np.ndarray  # (N+1, G) float32 multi-hot
    years: np.ndarray  # (N+1,) int64 year bucket id, 0 = unknown

    @staticmethod
    def none(num_items: int) -> ItemFeatures:
        return ItemFeatures(np.zeros((num_items + 1, 0), np.float32), np.zeros(num_items + 1, np.int64))


class ItemEncoder(nn.Module):
    """e(i) = id embedding + genre projection + year embedding, used on both sides of the model.

    Features are buffers, so the checkpoint carries them and serving needs nothing else.
    """

    item_genres: Tensor
    item_years: Tensor

    def __init__(self, num_items: int, d_model: int, num_genres: int, num_years: int) -> None:
        super().__init__()
        self.ids = nn.Embedding(num_items + 1, d_model, padding_idx=0)
        # Meta's init (truncated normal, std 0.02): the models scale tokens by sqrt(d), so an item starts at norm
        # ~0.02 d, well below what the layers add. A larger start (std d^-0.5, norm sqrt(d)) let an item's own
        # random embedding dominate the user state, and learning on short histories stalled for epochs.
        nn.init.trunc_normal_(self.ids.weight, std=0.02, a=-0.04, b=0.04)
        with torch.no_grad():
            self.ids.weight[0].zero_()
        self.genre_proj = nn.Linear(num_genres, d_model, bias=False) if num_genres else None
        self.years = nn.Embedding(num_years + 1, d_model, padding_idx=0) if num_years else None
        if self.years is not None:
            nn.init.normal_(self.years.weight, std=0.1 * d_model**-0.5)
        self.register_buffer("item_genres", torch.zeros(num_items + 1, num_genres))
        self.register_buffer("item_years", torch.zeros(num_items + 1, dtype=torch.long))

    def set_features(self, features: ItemFeatures) -> None:
        self.item_genres.copy_(torch.from_numpy(np.asarray(features.genres, np.float32)))
        self.item_years.copy_(torch.from_numpy(np.asarray(features.years, np.int64)))

    def forward(self, items: Tensor) -> Tensor:
        """(...) int64 dense ids -> (..., D) embeddings (zero for padding)."""
        out = self.ids(items)
        if self.genre_proj is not None:
            genres = self.item_genres[items]
            genres = genres / genres.sum(-1, keepdim=True).clamp(min=1.0)
            out = out + self.genre_proj(genres)
        if self.years is not None:
            out = out + self.years(self.item_years[items])
        return out * (items != 0).unsqueeze(-1)

    def table(self) -> Tensor:
        """(N+1, D) L2-normalised embeddings of every item, the retrieval index."""
        all_items = torch.arange(self.ids.num_embeddings, device=self.ids.weight.device)
        return F.normalize(self.forward(all_items), dim=-1)
