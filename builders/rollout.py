"""genrec rollout: move a running server to the repository's newest build, with no request failed or mixed.

For a server started with ``--model-control explicit`` (``genrec serve --model-control explicit``). The
composing models are reloaded first: each then holds the serving build and the new one (their version
policy keeps two). Then each ensemble is reloaded; its steps are pinned to the new build, and Triton swaps
an ensemble at once, so a request runs wholly on the old build or wholly on the new one, even when the
catalogue changed. Reloading goes through the repository API, which needs the admin key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from genrec.builders.build import COMPOSING, next_version
from genrec.builders.tritonserver import GRPC_ADMIN_HEADER, default_admin_key_file, read_or_create_admin_key
from genrec.client import protocol


class RolloutError(RuntimeError):
    """The repository holds no complete build, or the server refused or failed to load it."""


@dataclass(frozen=True)
class RolloutConfig:
    repository: Path
    url: str = "127.0.0.1:8001"
    admin_key_file: Path = field(default_factory=default_admin_key_file)
    tls_cert: Path | None = None  # the server's certificate when it serves gRPC over TLS


def newest_build(repository: Path) -> int:
    """The newest version that every served model has."""
    version = next_version(repository) - 1
    names = (*COMPOSING, *protocol.ENDPOINTS)
    missing = [name for name in names if not (repository / name / str(version)).is_dir()]
    if version < 1 or missing:
        raise RolloutError(f"{repository} holds no complete build (version {version} lacks {', '.join(missing)})")
    return version


def rollout(config: RolloutConfig) -> int:
    """Reload the composing models, then the ensembles, at the newest build; returns its version."""
    version = newest_build(config.repository)
    headers = {GRPC_ADMIN_HEADER: read_or_create_admin_key(config.admin_key_file)}
    tls = {} if config.tls_cert is None else {"ssl": True, "root_certificates": str(config.tls_cert)}
    with grpcclient.InferenceServerClient(config.url, **tls) as client:
        for name in (*COMPOSING, *protocol.ENDPOINTS):
            try:
                client.load_model(name, headers=headers)
                ready = client.is_model_ready(name, str(version))
            except InferenceServerException as error:
                raise RolloutError(f"{name}: {error.message()} (nothing after it was reloaded)") from None
            if not ready:
                raise RolloutError(f"{name} version {version} is not ready after loading")
    return version
