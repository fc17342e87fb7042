"""The one batch type for variable-length histories, used from training to serving."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class SequenceBatch:
    """Right-padded histories, padded only to the batch's own maximum length.

    Dense item ids start at 1; 0 is padding. Actions are 0 where unknown.
    """

    items: Tensor  # (B, T) int64
    timestamps: Tensor  # (B, T) int64, unix seconds
    actions: Tensor  # (B, T) int64
    lengths: Tensor  # (B,) int64, 1 <= lengths <= T
    # (B, S) int64: the items of each row's events before its first, right-padded with 0, where the rows were
    # cut from longer histories (a model's most recent `max_len`, a training window); None: nothing was cut.
    # No model reads them; they are the user's all the same (`seen_items`).
    earlier: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.items.shape[0])

    @property
    def max_len(self) -> int:
        return int(self.items.shape[1])

    def valid_mask(self) -> Tensor:
        """(B, T) bool: True on real events."""
        positions = torch.arange(self.max_len, device=self.items.device)
        return positions[None, :] < self.lengths[:, None]

    def seen_items(self) -> Tensor:
        """(B, S + T) every item each row's user has had, padded with 0: the earlier events' and the batch's."""
        return self.items if self.earlier is None else torch.cat([self.earlier, self.items], dim=1)

    def to(self, device: torch.device | str) -> SequenceBatch:
        return SequenceBatch(
            self.items.to(device),
            self.timestamps.to(device),
            self.actions.to(device),
            self.lengths.to(device),
            None if self.earlier is None else self.earlier.to(device),
        )

    def select(self, rows: Tensor) -> SequenceBatch:
        """Rows (N,) of the batch, padded only to their own longest."""
        width = int(self.lengths[rows].max())
        return SequenceBatch(
            self.items[rows, :width], self.timestamps[rows, :width], self.actions[rows, :width], self.lengths[rows],
            None if self.earlier is None else self.earlier[rows],
        )

    def length_groups(self, max_pairs: int = 1 << 22) -> list[Tensor]:
        """Row indices in groups of similar length (see ``length_groups``), each group's attention bounded."""
        groups = length_groups(self.lengths.cpu().numpy(), max_pairs=max_pairs)
        return [torch.from_numpy(g).to(self.lengths.device) for g in groups]

    def last_timestamps(self) -> Tensor:
        """(B,) the timestamp of each history's last event."""
        return self.timestamps.gather(1, (self.lengths - 1).clamp(min=0)[:, None]).squeeze(1)

    @staticmethod
    def from_jagged(
        items: np.ndarray, timestamps: np.ndarray, actions: np.ndarray, offsets: np.ndarray
    ) -> SequenceBatch:
        """Values + offsets (as in HSTU / torchrec) -> padded batch. offsets: (B+1,) int64."""
        offsets = np.asarray(offsets, dtype=np.int64)
        lengths = np.diff(offsets).astype(np.int64)
        return SequenceBatch(right_padded(items, offsets), right_padded(timestamps, offsets),
                             right_padded(actions, offsets), torch.from_numpy(lengths))

    @staticmethod
    def from_lists(
        items: Sequence[Sequence[int]],
        timestamps: Sequence[Sequence[int]] | None = None,
        actions: Sequence[Sequence[int]] | None = None,
    ) -> SequenceBatch:
        """Convenience for tests and callers holding Python lists, one list per user."""
        lengths = np.array([len(seq) for seq in items], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])

        def flat(rows: Sequence[Sequence[int]] | None) -> np.ndarray:
            if rows is None:
                return np.zeros(int(offsets[-1]), dtype=np.int64)
            return np.concatenate([np.asarray(r, dtype=np.int64) for r in rows]) if len(rows) else np.zeros(0)

        return SequenceBatch.from_jagged(flat(items), flat(timestamps), flat(actions), offsets)


def right_padded(values: np.ndarray, offsets: np.ndarray) -> Tensor:
    """Jagged values (row b is values[offsets[b]:offsets[b + 1]]) -> (B, longest) int64, padded with 0."""
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.arange(int(offsets[-1]) - int(offsets[0])) - np.repeat(offsets[:-1] - offsets[0], lengths)
    padded = np.zeros((len(lengths), int(lengths.max(initial=0))), dtype=np.int64)
    padded[rows, cols] = np.asarray(values, dtype=np.int64)[offsets[0] : offsets[-1]]
    return torch.from_numpy(padded)


def length_groups(
    lengths: np.ndarray, max_ratio: float = 1.5, floor: int = 32, max_pairs: int | None = None
) -> list[np.ndarray]:
    """Indices grouped by similar length, shortest first, so no group pads a short history to a long one's
    length (the cost of attention grows with the padded length): within a group the longest is at most
    max_ratio x the shortest, or at most `floor` events, and, given `max_pairs`, rows x longest^2 (the
    attention's score count) stays under it unless the group is a single row."""
    order = np.argsort(lengths, kind="stable")
    groups, start = [], 0
    for i in range(1, len(order) + 1):
        if (
            i == len(order)
            or lengths[order[i]] > max(floor, max_ratio * lengths[order[start]])
            or (max_pairs is not None and (i + 1 - start) * int(lengths[order[i]]) ** 2 > max_pairs)
        ):
            groups.append(order[start:i])
            start = i
    return groups
