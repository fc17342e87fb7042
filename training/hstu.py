"""HSTU, the generative recommender of "Actions Speak Louder than Words" (Zhai et al., ICML 2024).

One layer:  U, V, Q, K = split(SiLU(W · LayerNorm(x)))
            A = SiLU(Q Kᵀ + rab(position distance, time distance)) / max_len   (causal, no softmax)
            x = x + W_o · Dropout(LayerNorm(A V) ⊙ U)

The model is written around a per-layer K/V cache so that one set of layer weights serves three paths:
  * ``prefill``: new events attend to the cached history and causally to each other; their K/V are appended.
    Without a cache this is the ordinary forward pass. Positions and time gaps are relative, so a returning
    user costs only the new events (contract 2).
  * ``score_candidates``: every candidate is one more token at position L whose layers attend to the whole
    cached history and to itself only (M-FALCON). Candidates never see each other and are never written to
    the cache, so a candidate's score does not depend on the others (contract 1).
  * ``forward_with_candidates``: the reference for the above, one masked forward over history + candidates.
The attention is normalised by the constant ``max_len`` (not by the padded length), which makes results
exactly independent of batch padding and of how a history was split between prefill calls.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genrec.training import native
from genrec.training.batch import SequenceBatch
from genrec.training.embeddings import ItemEncoder
from genrec.training.popularity import RecentPopularity


@dataclass(frozen=True)
class HSTUConfig:
    num_items: int
    num_actions: int = 1  # action ids 0..num_actions-1, 0 = unknown
    num_genres: int = 0
    num_years: int = 0
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 1
    d_qk: int = 64  # per head
    d_v: int = 64  # per head
    max_len: int = 200
    dropout: float = 0.2
    # log-bucketed time gaps of the relative bias (Meta's 128); 0 = no time bias, for logs without time
    num_time_buckets: int = 128
    temperature: float = 0.05  # of the sampled softmax; the scorer starts from the retrieval logit / temperature
    num_tasks: int = 2  # ranking heads: 0 = engagement (the served score), 1 = high rating
    score_chunk: int = 512  # candidates scored per chunk, bounds memory for thousands of candidates
    # the scorer's recent-popularity features (see popularity.py): windows in seconds, and the table's time
    # buckets (0 = no popularity features); the table itself is fitted to the training log
    popularity_windows: tuple[int, ...] = ()
    popularity_buckets: int = 0

    def __post_init__(self) -> None:  # a JSON round trip gives a list
        object.__setattr__(self, "popularity_windows", tuple(self.popularity_windows))


@dataclass
class KVCache:
    """Per-layer keys and values of a batch of histories, right-padded to the batch's maximum.

    ``arena``, when set, is spare storage the tensors are views of: a returning user's new events are written
    into it in place instead of copying the whole cache (see ``KVArena``).
    """

    keys: Tensor  # (B, layers, L, H, d_qk): batch first, the layout of every runtime and every served tensor
    values: Tensor  # (B, layers, L, H, d_v)
    timestamps: Tensor  # (B, L) int64
    lengths: Tensor  # (B,) int64
    arena: KVArena | None = field(default=None, repr=False, compare=False)

    def select(self, index: Tensor) -> KVCache:
        """Rows `index` (N,) of the batch, e.g. one copy per cut point in training."""
        return KVCache(self.keys[index], self.values[index], self.timestamps[index], self.lengths[index])

    def with_lengths(self, lengths: Tensor) -> KVCache:
        """The same cache seen as its first `lengths` (B,) events (valid because layers are causal)."""
        return KVCache(self.keys, self.values, self.timestamps, lengths, self.arena)


class KVArena:
    """Cache storage with room to append: (B, layers, capacity + 1, ...), the last column a scratch slot for padding.

    ``filled`` (B,) counts the events written per row. Appending in place is safe only at ``filled``: a cache whose
    lengths differ (an older view, a branch) gets a fresh copy instead, so no cache handed out is ever overwritten.
    In-place writes happen only without autograd and in the inference mode the storage was made in.
    """

    def __init__(self, like: KVCache, width: int, capacity: int, rows: int | None = None) -> None:
        """Storage shaped as `like` for `rows` rows (default: like's), holding like's first `width` events."""
        b, layers, _, heads, d_qk = like.keys.shape
        b = b if rows is None else rows
        self.capacity = capacity
        self.inference = torch.is_inference_mode_enabled()
        self.keys = like.keys.new_zeros((b, layers, capacity + 1, heads, d_qk))
        self.values = like.values.new_zeros((b, layers, capacity + 1, heads, like.values.shape[-1]))
        self.timestamps = like.timestamps.new_zeros((b, capacity + 1))
        old = min(like.keys.shape[2], width)  # columns past a row's length are never read before being written
        self.keys[:, :, :old] = like.keys[:, :, :old]
        self.values[:, :, :old] = like.values[:, :, :old]
        self.timestamps[:, :old] = like.timestamps[:, :old]
        self.filled = like.lengths

    @classmethod
    def gather(cls, caches: Sequence[KVCache], capacity: int) -> KVArena:
        """Several one-user caches as the rows of one arena (each copied up to its length, zeros after), so
        that many users are appended to or scored in one pass."""
        arena = cls(caches[0], 0, capacity, rows=len(caches))
        for b, cache in enumerate(caches):
            arena.write(b, cache, 0, 0, int(cache.lengths[0]))
        arena.filled = torch.cat([c.lengths for c in caches])
        return arena

    def write(self, row: int, source: KVCache, source_row: int, start: int, end: int) -> None:
        """Events [start, end) of `source`'s `source_row` into this arena's `row`, in place."""
        self.keys[row, :, start:end] = source.keys[source_row, :, start:end]
        self.values[row, :, start:end] = source.values[source_row, :, start:end]
        self.timestamps[row, start:end] = source.timestamps[source_row, start:end]

    @classmethod
    def for_append(cls, cache: KVCache, width: int) -> KVArena:
        """Storage that can take the cache's events plus new ones up to `width`: its own arena if it may."""
        arena = cache.arena
        if (
            arena is not None
            and not torch.is_grad_enabled()
            and arena.inference == torch.is_inference_mode_enabled()
            and width <= arena.capacity
            and cache.keys.data_ptr() == arena.keys.data_ptr()
            and cache.values.data_ptr() == arena.values.data_ptr()
            and cache.timestamps.data_ptr() == arena.timestamps.data_ptr()
            and torch.equal(cache.lengths, arena.filled)
        ):
            return arena
        return cls(cache, width, capacity=width + max(16, width // 2))  # geometric growth: amortised O(1)

    def view(self, width: int, lengths: Tensor) -> KVCache:
        self.filled = lengths
        return KVCache(self.keys[:, :, :width], self.values[:, :, :width], self.timestamps[:, :width], lengths, self)


def time_bucket(seconds: Tensor, num_buckets: int) -> Tensor:
    """Log-bucketed absolute time gap, as in HSTU's relative time bias: Meta's width 0.301 = log10(2) makes
    a bucket ~1.35x the previous gap, so 128 buckets span 1 s to far beyond any log. (|gap| clamped at 1 s,
    log, truncated; computed in float32 from the first pass: the same buckets as in int64, at a fraction of
    the cost over a prefill's L^2 pairs.)"""
    gap = seconds.to(torch.float32, copy=True).abs_().clamp_(min=1)  # in place: L^2 values, one buffer
    return gap.log_().div_(0.301).clamp_(max=max(num_buckets - 1, 0)).long()


class RelativeBias(nn.Module):
    """rab(i, j) = w_pos[position distance] + w_time[bucket(time distance)], shared by the heads.

    The pairs' rows of the (position x time bucket) table are computed once per forward (``buckets``) and
    shared by every layer; each layer reads its table with one gather (a prefill's L^2 pairs, per layer).
    """

    def __init__(self, max_len: int, num_time_buckets: int) -> None:
        super().__init__()
        self.position = nn.Parameter(torch.zeros(max_len + 1))
        self.time = nn.Parameter(torch.zeros(num_time_buckets)) if num_time_buckets else None
        self._table: tuple[tuple[int, ...], Tensor] | None = None  # without autograd: (weights' versions, table)

    @staticmethod
    def buckets(distance: Tensor, gap_seconds: Tensor, config: HSTUConfig) -> Tensor:
        position = distance.clamp(0, config.max_len)
        if not config.num_time_buckets:
            return position
        return position.mul_(config.num_time_buckets).add_(time_bucket(gap_seconds, config.num_time_buckets))

    def forward(self, buckets: Tensor) -> Tensor:
        return self.weights()[buckets]

    def weights(self) -> Tensor:
        """The flat table that `buckets` index: the position weights, or the (position x time bucket) sums."""
        return self.position if self.time is None else self.table()

    def table(self) -> Tensor:
        """The flattened (position x time bucket) sums. Without autograd it is kept until the weights change
        (their version counters move with every in-place update): building it per call would cost a short
        request more than its pairs."""
        assert self.time is not None
        if torch.is_grad_enabled() or self.position.is_inference():  # inference tensors keep no version
            return (self.position[:, None] + self.time[None, :]).flatten()
        version = (self.position._version, self.time._version, self.position.data_ptr(), self.time.data_ptr())
        if self._table is None or self._table[0] != version:
            self._table = version, (self.position[:, None] + self.time[None, :]).flatten()
        return self._table[1]


MASKED = -1e9  # a masked key's bias: SiLU of it is exactly 0, so the mask needs no pass of its own


class HSTULayer(nn.Module):
    def __init__(self, config: HSTUConfig) -> None:
        super().__init__()
        self.config = config
        h, dqk, dv = config.num_heads, config.d_qk, config.d_v
        self.input_norm = nn.LayerNorm(config.d_model)
        self.uvqk = nn.Linear(config.d_model, h * (2 * dv + 2 * dqk))
        self.attn_norm = nn.LayerNorm(h * dv)
        self.out = nn.Linear(h * dv, config.d_model)
        self.bias = RelativeBias(config.max_len, config.num_time_buckets)
        self.dropout = nn.Dropout(config.dropout)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(..., D) -> u (..., H*dv), v (..., H, dv), q (..., H, dqk), k (..., H, dqk)."""
        h, dqk, dv = self.config.num_heads, self.config.d_qk, self.config.d_v
        u, v, q, k = F.silu(self.uvqk(self.input_norm(x))).split([h * dv, h * dv, h * dqk, h * dqk], dim=-1)
        return u, v.unflatten(-1, (h, dv)), q.unflatten(-1, (h, dqk)), k.unflatten(-1, (h, dqk))

    def finish(self, x: Tensor, attended: Tensor, u: Tensor) -> Tensor:
        """Residual update from the attention output (..., H, dv)."""
        return x + self.out(self.dropout(self.attn_norm(attended.flatten(-2)) * u))

    def step_fused(self, kernel: native.LayerKernel, x: Tensor, keys: Tensor, values: Tensor, width: int,
                   buckets: Tensor, limits: Tensor, write_pos: Tensor | None, self_index: int | None,
                   scale: float) -> Tensor:
        """The layer on new tokens x (B, T, D) against one layer's cache keys / values (B, rows, H, d), eval and
        without autograd, as two matmuls around one native call (`native.Kernels`): the projection's bias and
        SiLU, the attention (to keys 0 .. width-1 with bias rows from ``buckets`` (B, T or 1, width), keys past
        ``limits`` (B, T or 1) masked), the attention norm, the gate and the residual's bias. ``write_pos``:
        the tokens' keys and values are written into the cache at these rows first (an append); ``self_index``:
        each token also attends to itself with that bias (candidates)."""
        pre = torch.mm(self.input_norm(x).flatten(0, 1), self.uvqk.weight.t())  # the bias goes in with the SiLU
        y, residual = kernel(pre.view(*x.shape[:2], pre.shape[1]), self.uvqk.bias, keys, values, width, buckets,
                             limits, MASKED, write_pos, self_index, self.bias.weights(), self.attn_norm.weight, self.attn_norm.bias,
                             self.attn_norm.eps, x, self.out.bias, scale)
        return torch.addmm(residual.flatten(0, 1), y.flatten(0, 1), self.out.weight.t()).view_as(x)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, mask: Tensor) -> Tensor:
        """Pointwise attention. q (B, Tq, H, dqk), k/v (B, Tk, H, d), bias/mask (B, Tq, Tk) -> (B, Tq, H, dv)."""
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) + bias[:, None]
        weights = F.silu(scores) * mask[:, None] / self.config.max_len
        return torch.einsum("bhqk,bkhd->bqhd", weights, v)  # no attention dropout, as in the paper's code


def attend_cached(q: Tensor, keys: Tensor, values: Tensor, bias: Tensor, scale: float, causal: bool = False) -> Tensor:
    """`HSTULayer.attend` for serving (no autograd): q (B, T, H, dqk), keys/values (B, L, H, d), bias (B, T or
    1, L) holding `MASKED` where a key is masked -> (B, T, H, dv). ``causal``: query t is key t (a prefill from
    scratch), so it reads no key past t; those are masked in the bias too, this only skips them.

    The fused CPU kernel of `native` runs where it can: the same sums, the scores never written out.
    Elsewhere (export, autograd, no compiler), three kernels: the (T x L) scores per head are one ``baddbmm``
    (matmul plus bias) and one in-place SiLU, and the 1/max_len ``scale`` is applied to the (T, dv) result.
    """
    fused = native.attend_kernel(q, keys, values, bias)
    if fused is not None:
        return fused(q, keys, values, bias, scale, causal)
    heads = q.shape[2]
    bias = bias[:, None].expand(-1, heads, -1, -1).flatten(0, 1)  # (B*H, T or 1, L); flatten: shapes stay traced
    scores = torch.baddbmm(bias, q.transpose(1, 2).flatten(0, 1), keys.permute(0, 2, 3, 1).flatten(0, 1))
    out = torch.bmm(F.silu(scores, inplace=True), values.transpose(1, 2).flatten(0, 1))
    return out.unflatten(0, (-1, heads)).transpose(1, 2) * scale


class RankHead(nn.Module):
    """The ranking head: a correction to the retrieval logit per task, from the candidate token's final state
    and the candidate's recent popularity features (when the model has them)."""

    def __init__(self, d_model: int, num_features: int, num_tasks: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.hidden = nn.Linear(d_model, d_model)
        self.features = nn.Linear(num_features, d_model, bias=False) if num_features else None
        if self.features is not None:  # features are log counts, up to ~10: start them small
            nn.init.normal_(self.features.weight, std=0.02)
        self.correction = nn.Linear(d_model, num_tasks)
        # The served score starts as exactly the retrieval logit; the head learns only a correction to it.
        nn.init.zeros_(self.correction.weight)
        nn.init.zeros_(self.correction.bias)

    def forward(self, x: Tensor, features: Tensor | None) -> Tensor:
        hidden = self.hidden(self.norm(x))
        if self.features is not None and features is not None:
            hidden = hidden + self.features(features)
        return self.correction(F.silu(hidden))


class HSTU(nn.Module):
    def __init__(self, config: HSTUConfig) -> None:
        super().__init__()
        self.config = config
        self.items = ItemEncoder(config.num_items, config.d_model, config.num_genres, config.num_years)
        self.actions = nn.Embedding(config.num_actions, config.d_model)
        nn.init.normal_(self.actions.weight, std=0.1 * config.d_model**-0.5)
        self.input_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(HSTULayer(config) for _ in range(config.num_layers))
        self.popularity = (
            RecentPopularity(config.popularity_buckets, config.num_items, config.popularity_windows)
            if config.popularity_buckets else None
        )
        features = self.popularity.num_features if self.popularity is not None else 0
        self.rank_head = RankHead(config.d_model, features, config.num_tasks)

    @property
    def blocks(self) -> list[HSTULayer]:
        return cast(list[HSTULayer], list(self.layers))

    # ---- tokens -------------------------------------------------------------------------------------------

    def embed(self, items: Tensor, actions: Tensor) -> Tensor:
        """(B, T) ids -> (B, T, D) input tokens."""
        tokens = self.items(items) * math.sqrt(self.config.d_model) + self.actions(actions)
        return self.input_dropout(tokens)

    def item_table(self) -> Tensor:
        """(N+1, D) L2-normalised item embeddings: the retrieval index."""
        return self.items.table()

    # ---- prefill: history -> K/V cache + user embedding ----------------------------------------------------

    def prefill(self, batch: SequenceBatch, cache: KVCache | None = None) -> tuple[KVCache, Tensor]:
        """Encode new events on top of an optional cache.

        batch: the new events (B, N), right-padded, >= 1 per row. cache: the same users' earlier events.
        Returns the cache of all events and the user embedding (B, D), L2-normalised, at the last event.
        """
        outputs, new_cache = self._run_layers(batch, cache)
        last = (batch.lengths - 1).clamp(min=0)
        rows = torch.arange(batch.items.shape[0], device=last.device)  # a shape, not int(): traces dynamic
        user = outputs[rows, last]
        return new_cache, F.normalize(user, dim=-1)

    def user_embedding(self, batch: SequenceBatch) -> Tensor:
        """(B, T) history -> (B, D) user embedding at each history's last event."""
        return self.prefill(batch)[1]

    def encode(self, batch: SequenceBatch) -> Tensor:
        """(B, T) history -> (B, T, D) L2-normalised user embeddings after every prefix (training)."""
        return self.encode_with_cache(batch)[0]

    def encode_with_cache(self, batch: SequenceBatch) -> tuple[Tensor, KVCache]:
        """Training: every prefix's user embedding (B, T, D) and the K/V of all events."""
        outputs, cache = self._run_layers(batch, None)
        return F.normalize(outputs, dim=-1), cache

    def _run_layers(self, batch: SequenceBatch, cache: KVCache | None) -> tuple[Tensor, KVCache]:
        if cache is None:
            return self._forward(batch)
        return self._append(batch, cache)

    def _forward(self, batch: SequenceBatch) -> tuple[Tensor, KVCache]:
        """The forward over whole histories: keys are the events themselves (shape-only, so it exports).

        Training runs the plain masked form over (B, T, L) pairs. Without autograd (serving, evaluation, export)
        the same pairs are laid out key-major, (B, L, T): each key's bias for 16 queries is one vector of the
        fused kernel, which also skips the keys after each query (causal)."""
        b, n = batch.items.shape
        positions = torch.arange(n, device=batch.items.device)
        training = torch.is_grad_enabled()
        ts = batch.timestamps
        if training:
            query, key, gaps = positions[None, :, None], positions[None, None, :], ts[:, :, None] - ts[:, None, :]
        else:
            query, key, gaps = positions[None, None, :], positions[None, :, None], ts[:, None, :] - ts[:, :, None]
        distance = (query - key).expand(b, n, n)
        visible = (distance >= 0) & (key < batch.lengths[:, None, None])
        buckets = RelativeBias.buckets(distance, gaps, self.config)
        if training:
            mask = visible.float()
        else:
            padding = torch.zeros(visible.shape, device=visible.device).masked_fill_(~visible, MASKED)
        x = self.embed(batch.items, batch.actions)
        keys, values = [], []
        for layer in self.blocks:
            u, v, q, k = layer.project(x)
            if training:
                attended = layer.attend(q, k, v, layer.bias(buckets), mask)
            else:
                bias = layer.bias(buckets).add_(padding).transpose(1, 2)  # (B, T, L), query-fastest
                attended = attend_cached(q, k, v, bias, 1.0 / self.config.max_len, causal=True)
            x = layer.finish(x, attended, u)
            keys.append(k)
            values.append(v)
        return x, KVCache(torch.stack(keys, dim=1), torch.stack(values, dim=1), batch.timestamps, batch.lengths)

    def _append(self, batch: SequenceBatch, cache: KVCache) -> tuple[Tensor, KVCache]:
        """New events land after each row's cached events, written into the cache's arena (in place if it may)."""
        b, n = batch.items.shape
        device = batch.items.device
        total = cache.lengths + batch.lengths  # (B,)
        width = int(total.max())
        arena = KVArena.for_append(cache, width)
        new_pos = cache.lengths[:, None] + torch.arange(n, device=device)[None, :]
        write_pos = torch.where(batch.valid_mask(), new_pos, arena.capacity)  # padding goes to the scratch column
        rows = torch.arange(b, device=device)[:, None]
        arena.timestamps[rows, write_pos] = batch.timestamps
        timestamps = arena.timestamps[:, :width]

        key_pos = torch.arange(width, device=device)
        distance = new_pos[:, :, None] - key_pos[None, None, :]  # (B, N, W)
        buckets = RelativeBias.buckets(distance, batch.timestamps[:, :, None] - timestamps[:, None, :], self.config)
        x = self.embed(batch.items, batch.actions)
        scale = 1.0 / self.config.max_len
        kernel = None if self.training else native.layer_kernel(x, arena.keys, arena.values)
        if kernel is not None:  # key l visible to new event t where l <= its position and l < the row's total
            limits = torch.minimum(new_pos + 1, total[:, None])
            for i, layer in enumerate(self.blocks):
                x = layer.step_fused(kernel, x, arena.keys[:, i], arena.values[:, i], width, buckets, limits,
                                     write_pos, None, scale)
            return x, arena.view(width, total)
        masked = ~((distance >= 0) & (key_pos[None, None, :] < total[:, None, None]))
        padding = masked.float() * MASKED
        for i, layer in enumerate(self.blocks):
            u, v, q, k = layer.project(x)
            arena.keys[:, i][rows, write_pos] = k  # a view: written into the arena
            arena.values[:, i][rows, write_pos] = v
            attended = attend_cached(q, arena.keys[:, i, :width], arena.values[:, i, :width],
                                     layer.bias(buckets) + padding, scale)
            x = layer.finish(x, attended, u)
        return x, arena.view(width, total)

    # ---- candidate scoring against the cache ---------------------------------------------------------------

    def score_candidates(
        self, cache: KVCache, user: Tensor, candidates: Tensor, request_time: Tensor | None = None
    ) -> Tensor:
        """Score candidates (B, C) against each user's cached history -> logits (B, C, num_tasks).

        Task 0 is the served score: the retrieval logit <user, item> plus the ranking head's correction.
        ``request_time`` (B,) defaults to the last event's time. Candidates are processed in chunks.
        """
        if request_time is None:
            request_time = cache.timestamps.gather(1, (cache.lengths - 1).clamp(min=0)[:, None]).squeeze(1)
        chunks = [
            self.score_unchunked(cache, user, chunk, request_time)
            for chunk in candidates.split(self.config.score_chunk, dim=1)
        ]
        return torch.cat(chunks, dim=1)

    def score_unchunked(self, cache: KVCache, user: Tensor, candidates: Tensor, request_time: Tensor) -> Tensor:
        """`score_candidates` for one chunk of candidates, all at once: what the exported scorers run."""
        return self.head(self.candidate_states(cache, candidates, request_time), user, candidates, request_time)

    def candidate_states(self, cache: KVCache, candidates: Tensor, request_time: Tensor) -> Tensor:
        """Each candidate (B, C) as one more token after the cached history -> its final state (B, C, D)."""
        width = cache.keys.shape[2]
        key_pos = torch.arange(width, device=candidates.device)
        distance = cache.lengths[:, None] - key_pos[None, :]  # candidate sits at position L
        hist_buckets = RelativeBias.buckets(distance, request_time[:, None] - cache.timestamps, self.config)
        zero = torch.zeros(1, dtype=torch.long, device=candidates.device)
        self_buckets = RelativeBias.buckets(zero, zero, self.config)
        scale = 1.0 / self.config.max_len
        x = self.embed(candidates, torch.zeros_like(candidates))  # (B, C, D), action unknown
        kernel = None if self.training else native.layer_kernel(x, cache.keys, cache.values)
        if kernel is not None:
            index, limits = int(self_buckets), cache.lengths[:, None]
            for i, layer in enumerate(self.blocks):
                x = layer.step_fused(kernel, x, cache.keys[:, i], cache.values[:, i], width, hist_buckets[:, None],
                                     limits, None, index, scale)
            return x
        padding = (key_pos[None, :] >= cache.lengths[:, None]).float() * MASKED  # (B, L)
        for i, layer in enumerate(self.blocks):
            u, v, q, k = layer.project(x)
            hist = attend_cached(q, cache.keys[:, i], cache.values[:, i], (layer.bias(hist_buckets) + padding)[:, None], scale)
            own = F.silu((q * k).sum(-1) + layer.bias(self_buckets))  # (B, C, H): a candidate sees itself
            x = layer.finish(x, hist + (own * scale)[..., None] * v, u)
        return x

    def retrieval_logits(self, user: Tensor, items: Tensor) -> Tensor:
        """User (B, D) and items' normalised embeddings (B, C, D) -> <user, item> / temperature (B, C): the
        retrieval logit that the served score starts from."""
        return torch.einsum("bd,bcd->bc", user, items) / self.config.temperature

    def head(self, x: Tensor, user: Tensor, candidates: Tensor, request_time: Tensor) -> Tensor:
        """Candidates' final states (B, C, D) and the user (B, D) -> logits (B, C, num_tasks): task 0 the served score."""
        retrieval = self.retrieval_logits(user, F.normalize(self.items(candidates), dim=-1))
        features = self.popularity(candidates, request_time) if self.popularity is not None else None
        logits = self.rank_head(x, features)
        engagement = logits[..., :1] + retrieval[..., None]
        return torch.cat([engagement, logits[..., 1:]], dim=-1)

    def forward_with_candidates(self, batch: SequenceBatch, candidates: Tensor) -> Tensor:
        """Reference: one masked forward over history + candidates (B, C) -> logits (B, C, num_tasks).

        Quadratic in L + C; the serving path is ``prefill`` + ``score_candidates``.
        """
        b, n = batch.items.shape
        c = candidates.shape[1]
        device = batch.items.device
        request_time = batch.last_timestamps()
        items = torch.cat([batch.items, candidates], dim=1)
        actions = torch.cat([batch.actions, torch.zeros_like(candidates)], dim=1)
        times = torch.cat([batch.timestamps, request_time[:, None].expand(b, c)], dim=1)
        hist_pos = torch.arange(n, device=device)[None, :].expand(b, n)
        positions = torch.cat([hist_pos, batch.lengths[:, None].expand(b, c)], dim=1)  # candidates at L
        is_cand = torch.cat([torch.zeros(b, n, dtype=torch.bool, device=device),
                             torch.ones(b, c, dtype=torch.bool, device=device)], dim=1)
        valid = torch.cat([batch.valid_mask(), torch.ones(b, c, dtype=torch.bool, device=device)], dim=1)
        distance = positions[:, :, None] - positions[:, None, :]
        index = torch.arange(n + c, device=device)
        history_key = ~is_cand[:, None, :] & (distance >= 0) & valid[:, None, :]  # never a candidate
        own_key = (index[:, None] == index[None, :])[None]  # a candidate sees itself, no other candidate
        mask = history_key | own_key
        buckets = RelativeBias.buckets(distance, times[:, :, None] - times[:, None, :], self.config)
        x = self.embed(items, actions)
        for layer in self.blocks:
            u, v, q, k = layer.project(x)
            x = layer.finish(x, layer.attend(q, k, v, layer.bias(buckets), mask.float()), u)
        outputs = F.normalize(x[torch.arange(b, device=device), batch.lengths - 1], dim=-1)
        return self.head(x[:, n:], outputs, candidates, request_time)
