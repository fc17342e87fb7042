"""The container files say what `genrec serve` does: admin protocols behind a key, local binding, locked pods.

No Docker engine here: docker/serve.sh runs against a stand-in tritonserver that prints its arguments, and
the compose and k8s files are read as text.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from genrec.builders.tritonserver import ADMIN_HEADER, ADMIN_PROTOCOLS

DOCKER = Path(__file__).resolve().parents[2] / "docker"


def _serve_sh_arguments(tmp_path: Path, key_file: Path) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stand_in = bin_dir / "tritonserver"
    stand_in.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    stand_in.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "GENREC_ADMIN_KEY_FILE": str(key_file)}
    out = subprocess.run(["sh", str(DOCKER / "serve.sh"), "--model-control-mode=explicit"], env=env,
                         capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_serve_sh_restricts_the_admin_protocols_with_the_mounted_key(tmp_path: Path) -> None:
    key_file = tmp_path / "admin-key"
    key_file.write_text("s3cret-key\n")
    args = _serve_sh_arguments(tmp_path, key_file)
    restricted = f"{','.join(ADMIN_PROTOCOLS)}:{ADMIN_HEADER}=s3cret-key"
    assert f"--grpc-restricted-protocol={restricted}" in args
    assert f"--http-restricted-api={restricted}" in args
    assert args[-1] == "--model-control-mode=explicit"  # extra flags reach tritonserver


def test_serve_sh_without_a_key_locks_the_admin_protocols_with_a_random_one(tmp_path: Path) -> None:
    keys = set()
    for _ in range(2):
        args = _serve_sh_arguments(tmp_path, tmp_path / "absent")
        flag = next(a for a in args if a.startswith("--grpc-restricted-protocol="))
        keys.add(flag.rsplit("=", 1)[1])
    assert len(keys) == 2 and all(len(k) >= 24 for k in keys)


def test_compose_binds_locally_and_k8s_locks_the_pod() -> None:
    compose = (DOCKER / "compose.yaml").read_text()
    published = re.findall(r'^\s+- "([^"]+):(\d+):(\d+)"', compose, flags=re.M)
    assert published and all(host == "${GENREC_BIND_ADDRESS:-127.0.0.1}" for host, _, _ in published)
    assert "cap_drop: [ALL]" in compose and "read_only: true" in compose
    k8s = (DOCKER / "k8s.yaml").read_text()
    for needed in ("kind: NetworkPolicy", "readOnlyRootFilesystem: true", "drop: [ALL]",
                   "secretName: genrec-admin-key", "/opt/genrec/serve.sh"):
        assert needed in k8s, needed


def test_k8s_gives_each_replica_a_stable_name_for_user_routing() -> None:
    """The user cache lives in each pod: a StatefulSet whose serviceName is a headless Service, and no
    Deployment or ClusterIP balancing that would scatter a user's requests."""
    k8s = (DOCKER / "k8s.yaml").read_text()
    kinds = re.findall(r"^kind: (\w+)", k8s, flags=re.M)
    assert "StatefulSet" in kinds and "Deployment" not in kinds
    assert re.search(r"^  serviceName: genrec-triton\b", k8s, flags=re.M)
    assert re.search(r"^  clusterIP: None\b", k8s, flags=re.M) and "type: ClusterIP" not in k8s
    assert "PodDisruptionBudget" in kinds and "maxUnavailable: 1" in k8s  # drains take one pod at a time
    assert ":latest" not in k8s and "OMP_NUM_THREADS" in k8s
