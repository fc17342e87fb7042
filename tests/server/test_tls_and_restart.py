"""A server of its own: gRPC over TLS with a self-signed certificate, killed and restarted on the same port.

The same `RecommendClient` object is used throughout: its TLS options, and its channel reconnecting soon
after the restarted server is ready (gRPC's default reconnect backoff left it UNAVAILABLE for seconds).
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from server_constants import RETRIEVE_K

from genrec.builders.build import BuildConfig, build_repository
from genrec.builders.tritonserver import ServerConfig, TritonServer, free_ports
from genrec.client import GenrecError, RecommendClient
from genrec.training.checkpoint import load_meta

pytestmark = pytest.mark.server


def _self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "server.crt", directory / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


def test_tls_with_the_clients_ssl_options_and_reconnect_after_a_restart(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    repository = tmp_path / "repository"
    build_repository(BuildConfig(checkpoint=tiny_checkpoint, repository=repository, retrieve_k=RETRIEVE_K))
    cert, key = _self_signed(tmp_path)
    grpc, http, metrics = free_ports(3)
    config = ServerConfig(repository, grpc_port=grpc, http_port=http, metrics_port=metrics, tls_cert=cert, tls_key=key)
    history = load_meta(tiny_checkpoint).item_raw_ids[:5].tolist()

    with TritonServer(config) as first:
        plaintext = RecommendClient(first.url, timeout_s=5.0, retries=0)
        with pytest.raises(GenrecError) as info:
            plaintext.recommend(history)
        assert info.value.status == "UNAVAILABLE"
        plaintext.close()
        client = RecommendClient(first.url, timeout_s=5.0, retries=0, ssl=True, root_certificates=str(cert))
        before = client.recommend(history, k=5)
        assert len(before.items) == 5
        first.send_signal(signal.SIGKILL)  # a crash
        first.wait()
        with pytest.raises(GenrecError) as info:
            client.recommend(history, k=5)
        assert info.value.status == "UNAVAILABLE"

    # Callers keep calling while the server restarts (each attempt UNAVAILABLE), as they would in production:
    # that is what grew gRPC's reconnect backoff. Measured: from ready to the same client's first success.
    second = TritonServer(config)
    second.start()
    ready: list[float] = []
    waiter = threading.Thread(target=lambda: (second.wait_ready(), ready.append(time.perf_counter())))
    waiter.start()
    try:
        while True:
            try:
                after = client.recommend(history, k=5)
                break
            except GenrecError as error:
                assert error.status == "UNAVAILABLE" and not (ready and time.perf_counter() - ready[0] > 10), error
                time.sleep(0.05)
        succeeded = time.perf_counter()
        waiter.join()
    finally:
        second.stop()
    reconnected_s = succeeded - ready[0]
    client.close()
    assert after.item_ids.tolist() == before.item_ids.tolist()
    # Reconnect attempts are at most 1 s apart (+-20% gRPC jitter); the default backoff had grown to seconds.
    assert reconnected_s < 1.5, reconnected_s
