"""The numeric core of the served models, behind one interface per runtime (torch, onnx).

Served models (``genrec.builders.handlers``) do validation, id mapping and batching in numpy and call a
Runtime for the maths, so every runtime serves exactly the same pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from genrec.training.batch import SequenceBatch
from genrec.training.checkpoint import load_checkpoint
from genrec.training.hstu import HSTU, KVCache


@dataclass
class Prefilled:
    """A batch of encoded histories, right-padded to the batch's longest."""

    keys: np.ndarray  # (layers, B, L, H, d_qk) float32
    values: np.ndarray  # (layers, B, L, H, d_v) float32
    user: np.ndarray  # (B, D) float32, L2-normalised


class Runtime(Protocol):
    def prefill(self, items: np.ndarray, timestamps: np.ndarray, actions: np.ndarray, lengths: np.ndarray) -> Prefilled:
        """items/timestamps/actions (B, L) int64 right-padded, lengths (B,) int64."""
        ...

    def score(
        self,
        keys: np.ndarray,
        values: np.ndarray,
        timestamps: np.ndarray,
        lengths: np.ndarray,
        user: np.ndarray,
        candidates: np.ndarray,
    ) -> np.ndarray:
        """Cached K/V (layers, B, L, H, d), timestamps (B, L), lengths (B,), user (B, D), candidates (B, C)
        dense ids -> (B, C) float32 served scores (task 0)."""
        ...


class TorchRuntime:
    """The reference runtime: the checkpoint's PyTorch modules, CPU or CUDA."""

    def __init__(self, checkpoint: Path, device: str = "cpu") -> None:
        model, _ = load_checkpoint(checkpoint, device)
        if not isinstance(model, HSTU):
            raise ValueError(f"{checkpoint}: only HSTU checkpoints can be served (got {type(model).__name__})")
        self.model = model
        self.device = torch.device(device)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    @torch.inference_mode()
    def prefill(self, items: np.ndarray, timestamps: np.ndarray, actions: np.ndarray, lengths: np.ndarray) -> Prefilled:
        batch = SequenceBatch(self._tensor(items), self._tensor(timestamps), self._tensor(actions), self._tensor(lengths))
        cache, user = self.model.prefill(batch)
        return Prefilled(cache.keys.cpu().numpy(), cache.values.cpu().numpy(), user.cpu().numpy())

    @torch.inference_mode()
    def score(
        self,
        keys: np.ndarray,
        values: np.ndarray,
        timestamps: np.ndarray,
        lengths: np.ndarray,
        user: np.ndarray,
        candidates: np.ndarray,
    ) -> np.ndarray:
        cache = KVCache(self._tensor(keys), self._tensor(values), self._tensor(timestamps), self._tensor(lengths))
        logits = self.model.score_candidates(cache, self._tensor(user), self._tensor(candidates))
        return logits[..., 0].float().cpu().numpy()
