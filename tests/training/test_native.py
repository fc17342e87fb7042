"""The fused attention kernel against the eager form it replaces, and the fallback where it cannot run."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genrec.training import native
from genrec.training.batch import SequenceBatch
from genrec.training.hstu import HSTU, MASKED, HSTUConfig, attend_cached


def _eager(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """`HSTULayer.attend`'s sums, written out: silu(q . k + bias) v * scale."""
    scores = torch.einsum("bthd,blhd->bhtl", q, keys) + bias[:, None]
    return torch.einsum("bhtl,blhd->bthd", F.silu(scores), values) * scale


@pytest.mark.parametrize(
    ("b", "t", "heads", "length", "dq", "dv"),
    [
        (1, 100, 8, 1000, 16, 16),  # the reference model's scoring
        (3, 17, 2, 50, 16, 16),  # a partial block of queries, several users
        (2, 1, 1, 1, 50, 50),  # the paper preset's head, one key
        (1, 40, 3, 70, 8, 24),  # d_qk != d_v, odd sizes
    ],
)
def test_kernel_matches_the_eager_form(b: int, t: int, heads: int, length: int, dq: int, dv: int) -> None:
    if shutil.which(os.environ.get("CXX", "g++")) is None:  # optional: without a compiler the eager form serves
        pytest.skip("no C++ compiler on this machine: the fused kernel is optional (see test_without_a_compiler...)")
    assert native.kernel(dq, dv) is not None, native.failure(dq, dv)
    generator = torch.Generator().manual_seed(0)
    projected = torch.randn(b, t, heads * (dq + 7), generator=generator)  # q as a view into a wider projection
    q = projected[..., : heads * dq].unflatten(-1, (heads, dq))
    keys = torch.randn(b, length, heads, dq, generator=generator)
    values = torch.randn(b, length, heads, dv, generator=generator)
    bias = torch.randn(b, 1, length, generator=generator) * 3
    bias[0, :, length // 2 + 1:] = MASKED  # padding keys contribute exactly nothing
    with torch.inference_mode():
        fused = attend_cached(q, keys, values, bias, 1 / 64)
        expected = _eager(q, keys, values, bias, 1 / 64)
        # fp32 sums of `length` terms in another order differ by ~sqrt(length) ulps of the terms' magnitude,
        # not of the (possibly cancelling) result: measure against that (the kernel's vector width and so its
        # order follow -march=native)
        scores = torch.einsum("bthd,blhd->bhtl", q, keys) + bias[:, None]
        magnitude = torch.einsum("bhtl,blhd->bthd", F.silu(scores).abs(), values.abs()) / 64
    assert fused.shape == (b, t, heads, dv)
    np.testing.assert_array_less((fused - expected).abs().numpy(), (1e-5 * magnitude + 1e-7).numpy())


@pytest.mark.parametrize("build", ["native", "portable"])
def test_kernel_silu_over_the_whole_float_range(build: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The kernel's inline SiLU, read through one key whose score is the bias: within 1e-5 relative of torch's
    from -150 to 150, exactly 0 for a masked key, x for a huge one. ``portable`` builds without AVX-512 (the
    vector-extension fallback that other CPUs compile)."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler on this machine: the fused kernel is optional")
    if build == "portable":
        monkeypatch.setenv("GENREC_KERNEL_CACHE", str(tmp_path))
        monkeypatch.setattr(native, "FLAGS", tuple("-march=x86-64-v3" if f == "-march=native" else f
                                                   for f in native.FLAGS))
        kernels = native._load(16, 16)
    else:
        kernels = native.kernel(16, 16)
    assert kernels is not None
    kernel = kernels.attend
    x = torch.cat([torch.linspace(-150, 150, 30001), torch.tensor([MASKED, 1e9, 0.0])])
    q, keys, values = torch.zeros(1, x.numel(), 1, 16), torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 1, 16)
    values[..., 0] = 1
    with torch.inference_mode():
        out = kernel(q, keys, values, x.view(1, -1, 1).contiguous(), 1.0, False)[0, :, 0, 0].double()
    expected = F.silu(x.double())
    np.testing.assert_array_less((out - expected).abs().numpy(), (1e-5 * expected.abs() + 1e-30).numpy())
    assert out[-3:].tolist() == [0.0, 1e9, 0.0]


@pytest.mark.parametrize("query_fastest", [True, False])
@pytest.mark.parametrize(("b", "t", "heads", "dq", "dv"), [(1, 200, 8, 16, 16), (2, 37, 3, 8, 24)])
def test_kernel_with_a_bias_row_per_query_and_causal(query_fastest: bool, b: int, t: int, heads: int, dq: int,
                                                     dv: int) -> None:
    """A prefill's attention: each query its own bias row (stored either way round), keys past the query
    masked, which ``causal`` skips: the same sums as the eager form."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler on this machine: the fused kernel is optional")
    generator = torch.Generator().manual_seed(2)
    q, keys = torch.randn(b, t, heads, dq, generator=generator), torch.randn(b, t, heads, dq, generator=generator)
    values = torch.randn(b, t, heads, dv, generator=generator)
    bias = torch.randn(b, t, t, generator=generator)
    bias = bias.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), MASKED)  # key l > query t: masked
    bias[-1, :, t - 3 :] = MASKED  # the last user's padding
    if query_fastest:
        bias = bias.transpose(1, 2).contiguous().transpose(1, 2)
    with torch.inference_mode():
        assert native.attend_kernel(q, keys, values, bias) is not None
        expected = _eager(q, keys, values, bias, 1 / 32)
        scores = torch.einsum("bthd,blhd->bhtl", q, keys) + bias[:, None]
        magnitude = torch.einsum("bhtl,blhd->bthd", F.silu(scores).abs(), values.abs()) / 32
        for causal in (False, True):
            fused = attend_cached(q, keys, values, bias, 1 / 32, causal=causal)
            np.testing.assert_array_less((fused - expected).abs().numpy(), (1e-5 * magnitude + 1e-7).numpy())


def test_serving_calls_take_the_kernel_and_the_rest_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scoring and prefill (no grad, one bias row or one per query) run the kernel; export tracing, another
    dtype, or GENREC_NATIVE=0 not.

    tests/training/test_hstu_cache.py checks the scores it gives against the reference forward pass.
    """
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler on this machine: the fused kernel is optional")
    q, keys, values = torch.randn(1, 3, 2, 8), torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 4)
    with torch.no_grad():
        assert native.attend_kernel(q, keys, values, torch.zeros(1, 1, 5)) is not None
        assert native.attend_kernel(q, keys, values, torch.zeros(1, 3, 5)) is not None  # one row per query
        assert native.attend_kernel(q.double(), keys.double(), values.double(), torch.zeros(1, 1, 5).double()) is None
        monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
        assert native.attend_kernel(q, keys, values, torch.zeros(1, 1, 5)) is None
        monkeypatch.undo()
        monkeypatch.setenv("GENREC_NATIVE", "0")
        assert native.attend_kernel(q, keys, values, torch.zeros(1, 1, 5)) is None


# (heads, d_qk, d_v): d_qk != d_v; the paper preset's one head of 50, whose rows (200 and 50 floats) end in a
# partial vector
HEADS = [(3, 8, 24), (1, 50, 50)]


def _random_model(time_buckets: int, heads: tuple[int, int, int]) -> HSTU:
    """A small eval-mode HSTU, every parameter re-drawn at std 0.5 (at init the bias tables are zero and the
    layers near identity, which would hide a wrong term)."""
    torch.manual_seed(3)
    config = HSTUConfig(num_items=300, d_model=40, num_layers=2, num_heads=heads[0], d_qk=heads[1], d_v=heads[2],
                        max_len=64, num_time_buckets=time_buckets)
    model = HSTU(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.5)
    return model


def _histories(lengths: list[int], start: int = 1_600_000_000) -> SequenceBatch:
    n = max(lengths)
    items = torch.randint(1, 301, (len(lengths), n))
    times = torch.cumsum(torch.randint(0, 10**5, (len(lengths), n)), dim=1) + start
    return SequenceBatch(items=items, actions=torch.zeros_like(items), timestamps=times,
                         lengths=torch.tensor(lengths))


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("time_buckets", [128, 0])
def test_fused_candidate_layers_match_the_eager_ones(time_buckets: int, heads: tuple[int, int, int],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`HSTU.candidate_states` through `HSTULayer.step_fused` (one native call a layer) against the eager
    layers: several users of different lengths in a padded cache, a partial block of candidates, the HEADS sizes,
    with and without the time bias. Under autograd or in train mode the eager layers run."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler on this machine: the fused kernel is optional")
    model = _random_model(time_buckets, heads)
    batch = _histories([50, 17, 1])
    candidates = torch.randint(1, 301, (3, 37))
    with torch.inference_mode():
        cache, _ = model.prefill(batch)
        request_time = batch.timestamps[:, -1] + 600
        assert native.layer_kernel(model.embed(candidates, candidates * 0), cache.keys, cache.values)
        fused = model.candidate_states(cache, candidates, request_time)
        assert model.candidate_states(cache, candidates[:, :0], request_time).shape == (3, 0, 40)  # none to score
        monkeypatch.setenv("GENREC_NATIVE", "0")
        eager = model.candidate_states(cache, candidates, request_time)
    assert (fused - eager).abs().max() < 1e-5 * eager.abs().max()
    assert (eager - model.embed(candidates, candidates * 0)).abs().max() > 0.1  # the layers did move the tokens
    monkeypatch.undo()
    x = model.embed(candidates, candidates * 0)
    assert native.layer_kernel(x, cache.keys, cache.values) is None  # autograd: x requires grad


def test_without_a_compiler_the_eager_form_runs(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    monkeypatch.setattr(native, "_kernels", {})
    monkeypatch.setattr(native, "_failures", {})
    generator = torch.Generator().manual_seed(1)
    q, keys, values = (torch.randn(1, n, 2, 16, generator=generator) for n in (5, 9, 9))
    bias = torch.zeros(1, 1, 9)
    with torch.inference_mode(), caplog.at_level("WARNING"):
        out = attend_cached(q, keys, values, bias, 0.5)
    assert "no C++ compiler '/nonexistent/g++'" in (native.failure(16, 16) or "")
    assert "using the eager form" in caplog.text
    np.testing.assert_allclose(out.numpy(), _eager(q, keys, values, bias, 0.5).numpy(), rtol=1e-5, atol=1e-6)


def test_autograd_keeps_the_eager_form() -> None:
    q = torch.randn(1, 4, 2, 16, requires_grad=True)
    keys, values = torch.randn(1, 6, 2, 16), torch.randn(1, 6, 2, 16)
    out = attend_cached(q, keys, values, torch.zeros(1, 1, 6), 1.0)
    out.sum().backward()  # the kernel has no backward: it must not have run
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("time_buckets", [128, 0])
def test_fused_append_matches_the_eager_one(time_buckets: int, heads: tuple[int, int, int],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """New events appended to cached histories through `HSTULayer.step_fused` (keys and values written into the
    arena by the native call) against the eager layers: the same outputs and the same cache, for users of
    different cached lengths each appending a different number of events (padding in the new batch)."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler on this machine: the fused kernel is optional")
    model = _random_model(time_buckets, heads)
    history, new = _histories([30, 9, 1]), _histories([5, 1, 3], start=1_700_000_000)
    results = {}
    with torch.inference_mode():
        for native_on in ("1", "0"):
            monkeypatch.setenv("GENREC_NATIVE", native_on)
            cache, _ = model.prefill(history)
            extended, user = model.prefill(new, cache)
            results[native_on] = user, extended
    (user, cache), (eager_user, eager_cache) = results["1"], results["0"]
    assert torch.equal(cache.lengths, torch.tensor([35, 10, 4]))
    assert (user - eager_user).abs().max() < 1e-5
    for row, length in enumerate(cache.lengths.tolist()):
        for name in ("keys", "values"):
            fused, eager = getattr(cache, name)[row, :, :length], getattr(eager_cache, name)[row, :, :length]
            assert (fused - eager).abs().max() < 1e-5 * eager.abs().max()
