"""SASRec (Kang & McAuley, 2018): causal softmax self-attention with learned positions. The baseline."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genrec.training.batch import SequenceBatch
from genrec.training.embeddings import ItemEncoder


@dataclass(frozen=True)
class SASRecConfig:
    num_items: int
    num_actions: int = 1  # unused: SASRec sees items only, as in the paper
    num_genres: int = 0
    num_years: int = 0
    d_model: int = 50
    num_layers: int = 2
    num_heads: int = 1
    max_len: int = 200
    dropout: float = 0.2
    temperature: float = 0.05


class SASRecBlock(nn.Module):
    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.d_model)
        self.attn = nn.MultiheadAttention(config.d_model, config.num_heads, dropout=config.dropout, batch_first=True)
        self.ffn_norm = nn.LayerNorm(config.d_model)
        self.ffn = nn.Sequential(
            nn.Linear(config.d_model, config.d_model),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.d_model, config.d_model),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: Tensor, causal: Tensor, padding: Tensor) -> Tensor:
        q = self.attn_norm(x)
        attended, _ = self.attn(q, x, x, attn_mask=causal, key_padding_mask=padding, need_weights=False)
        x = q + attended  # the original SASRec adds the residual to the normalised query
        return x + self.ffn(self.ffn_norm(x))


class SASRec(nn.Module):
    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        self.items = ItemEncoder(config.num_items, config.d_model, config.num_genres, config.num_years)
        self.positions = nn.Embedding(config.max_len, config.d_model)
        # Meta's positional preprocessor init (std d^-0.5): the same scale as an item token, std 0.02 x sqrt(d)
        # (torch's default N(0, 1) would drown the items by ~7x at d=50)
        nn.init.trunc_normal_(self.positions.weight, std=config.d_model**-0.5)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(SASRecBlock(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.d_model)

    def item_table(self) -> Tensor:
        return self.items.table()

    def encode(self, batch: SequenceBatch) -> Tensor:
        """(B, T) history -> (B, T, D) L2-normalised user embeddings after every prefix."""
        t = batch.max_len
        positions = torch.arange(t, device=batch.items.device)
        x = self.items(batch.items) * math.sqrt(self.config.d_model) + self.positions(positions)[None]
        x = self.dropout(x) * batch.valid_mask()[..., None]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=1)
        padding = ~batch.valid_mask()
        for block in self.blocks:
            x = block(x, causal, padding) * batch.valid_mask()[..., None]
        return F.normalize(self.final_norm(x), dim=-1)

    def user_embedding(self, batch: SequenceBatch) -> Tensor:
        """(B, T) history -> (B, D) user embedding at each history's last event."""
        outputs = self.encode(batch)
        return outputs[torch.arange(batch.batch_size, device=outputs.device), batch.lengths - 1]
