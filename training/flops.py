"""Analytic FLOP counts of a training step, for the speed tables: what the step must compute, not what it ran.

Counts multiply-adds as 2 FLOPs in the matmuls only (projections, attention, the retrieval logits), on each
batch's padded shape, since that is what the kernels execute; backward costs twice the forward.
Elementwise work (norms, SiLU, biases) is left out: it is memory-bound and small in FLOPs.
"""

from __future__ import annotations

from genrec.training.batch import SequenceBatch
from genrec.training.hstu import HSTUConfig
from genrec.training.losses import LossConfig, uses_full_softmax
from genrec.training.sasrec import SASRecConfig


def encoder_forward_flops(config: HSTUConfig | SASRecConfig, batch: int, length: int) -> int:
    """Forward FLOPs of the sequence encoder over a (batch, length) padded batch."""
    d, n = config.d_model, length
    if isinstance(config, HSTUConfig):
        h, dqk, dv = config.num_heads, config.d_qk, config.d_v
        per_token = 2 * d * h * (2 * dv + 2 * dqk) + 2 * h * dv * d  # uvqk and output projections
        attention = 2 * n * n * h * (dqk + dv)  # Q Kᵀ and A V over the full (padded) square
    else:
        per_token = 2 * d * 4 * d + 2 * 2 * d * d  # q, k, v, out projections; the two FFN layers
        attention = 2 * n * n * 2 * d
    return config.num_layers * batch * (n * per_token + attention)


def train_step_flops(config: HSTUConfig | SASRecConfig, loss: LossConfig, batch: SequenceBatch) -> int:
    """FLOPs of one training step on `batch`: encoder and retrieval loss, forward and backward.

    The HSTU ranking objective (a bounded number of cut points x candidates) is not counted.
    """
    b, n = batch.items.shape
    positions = int(batch.lengths.sum()) - b  # every position but the last predicts the next item
    classes = config.num_items if uses_full_softmax(loss, config.num_items) else loss.num_negatives
    logits = 2 * positions * config.d_model * classes
    return 3 * (encoder_forward_flops(config, b, n) + logits)
