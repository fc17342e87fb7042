"""A seeded fuzz of malformed requests across all eight served models (`genrec.benchmarks.fuzz`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from genrec.benchmarks.fuzz import MODELS, fuzz, valid_requests
from genrec.builders.tritonserver import TritonServer
from genrec.client import RecommendClient
from genrec.training.checkpoint import load_meta

pytestmark = pytest.mark.server


@pytest.mark.parametrize("server", ["torch"], indirect=True)
def test_600_malformed_requests_get_no_internal_error_and_change_nothing(
    server: TritonServer, client: RecommendClient, tiny_checkpoint: Path
) -> None:
    known = load_meta(tiny_checkpoint).item_raw_ids.tolist()
    history, candidates = known[:8], known[10:30]
    canonical = client.recommend(history, k=5)
    valid = valid_requests(server.url, history, candidates)
    assert sorted(valid) == sorted(MODELS)

    result = fuzz(server.url, valid, count=600, seed=0, timeout_s=30.0)

    assert result.sent == 600 and not result.internal, result.internal[:5]
    assert result.statuses["INVALID_ARGUMENT"] > 400, result.statuses  # most mutations are errors ...
    assert len(result.mutations) >= 9  # ... of every kind
    with grpcclient.InferenceServerClient(server.url) as raw:
        assert raw.is_server_live() and all(raw.is_model_ready(m) for m in MODELS)
    after = client.recommend(history, k=5)
    assert after.item_ids.tolist() == canonical.item_ids.tolist()
    np.testing.assert_array_equal(after.scores, canonical.scores)
