"""Analytic FLOP counts, for the speed tables: what a training step or a served call must compute, not what
it ran.

Counts multiply-adds as 2 FLOPs in the matmuls only (projections, attention, the retrieval logits), on each
batch's padded shape, since that is what the kernels execute; backward costs twice the forward.
Elementwise work (norms, SiLU, biases) is left out: it is memory-bound and small in FLOPs.
"""

from __future__ import annotations

from genrec.training.batch import SequenceBatch
from genrec.training.hstu import HSTUConfig
from genrec.training.losses import LossConfig, uses_full_softmax
from genrec.training.sasrec import SASRecConfig

# -- HSTU's serving paths ------------------------------------------------------------------------------------
# With d = d_model, H heads, n layers (multiply-add = 2 FLOPs):
#   token  = 2·d·(2·H·d_v + 2·H·d_qk)  [U,V,Q,K projection]  + 2·H·d_v·d  [output projection]
#   pair   = 2·H·d_qk  [q·k]  + 2·H·d_v  [weight·v]            per (query, key) pair the mask allows
#   head   = 2·d·d + 2·d·tasks  [rank head]  + 2·d  [retrieval dot product]
#   prefill(N new on top of P cached) = n·(N·token + (N·P + N(N+1)/2)·pair)
#   cached(L, C)   = C·(n·(token + (L+1)·pair) + head)              a candidate sees L events and itself
#   no-cache(L, C) = C·(n·((L+1)·token + (L(L+1)/2 + L+1)·pair) + head)
# Only the pairs the mask allows count (the model's useful work).


def token_flops(c: HSTUConfig) -> int:
    h, d = c.num_heads, c.d_model
    return 2 * d * (2 * h * c.d_v + 2 * h * c.d_qk) + 2 * h * c.d_v * d


def pair_flops(c: HSTUConfig) -> int:
    return 2 * c.num_heads * c.d_qk + 2 * c.num_heads * c.d_v


def head_flops(c: HSTUConfig) -> int:
    return 2 * c.d_model * c.d_model + 2 * c.d_model * c.num_tasks + 2 * c.d_model


def prefill_flops(c: HSTUConfig, new: int, cached: int = 0) -> int:
    pairs = new * cached + new * (new + 1) // 2
    return c.num_layers * (new * token_flops(c) + pairs * pair_flops(c))


def cached_score_flops(c: HSTUConfig, length: int, num_candidates: int) -> int:
    per_candidate = c.num_layers * (token_flops(c) + (length + 1) * pair_flops(c)) + head_flops(c)
    return num_candidates * per_candidate


def nocache_score_flops(c: HSTUConfig, length: int, num_candidates: int) -> int:
    pairs = length * (length + 1) // 2 + length + 1
    per_candidate = c.num_layers * ((length + 1) * token_flops(c) + pairs * pair_flops(c)) + head_flops(c)
    return num_candidates * per_candidate


def cache_bytes(c: HSTUConfig, length: int) -> int:
    """fp32 K/V of one history: what the cached path must read per candidate chunk."""
    return 4 * c.num_layers * length * c.num_heads * (c.d_qk + c.d_v)


# -- training -------------------------------------------------------------------------------------------------


def encoder_forward_flops(config: HSTUConfig | SASRecConfig, batch: int, length: int) -> int:
    """Forward FLOPs of the sequence encoder over a (batch, length) padded batch."""
    d, n = config.d_model, length
    if isinstance(config, HSTUConfig):
        per_token = token_flops(config)  # uvqk and output projections
        attention = n * n * pair_flops(config)  # Q Kᵀ and A V over the full (padded) square
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
