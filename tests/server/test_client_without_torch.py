"""The genrec-client package on its own: a fresh virtualenv, `pip install client/`, no torch.

The package is installed as users install it (not editable, from a copy of client/, dependencies
from the package index), then its API and its `genrec-client` command ask the real server and must
answer exactly as the client of the development environment does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from genrec.builders.tritonserver import TritonServer
from genrec.client import RecommendClient
from genrec.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.server
CLIENT_DIR = Path(__file__).resolve().parents[2] / "client"
INSTALL_TIMEOUT_S = 240  # numpy and tritonclient[grpc] from the index (or pip's cache)

# What the installed package looks like from inside its virtualenv, and one recommendation.
PROBE = """
import importlib.metadata, importlib.util, json, sys
import genrec, genrec.client, genrec.client.aio, genrec.client.cli
from genrec.client import RecommendClient
url, items = sys.argv[1], [int(i) for i in sys.argv[2].split(",")]
with RecommendClient(url, timeout_s=60) as client:
    recs = client.recommend(items, k=5)
dist = importlib.metadata.distribution("genrec-client")
print(json.dumps({
    "client_file": genrec.client.__file__,
    "genrec_file": getattr(genrec, "__file__", None),
    "genrec_path": list(genrec.__path__),
    "training": importlib.util.find_spec("genrec.training") is not None,
    "files": sorted(str(f) for f in dist.files if str(f).startswith("genrec")),
    "direct_url": dist.read_text("direct_url.json"),
    "item_ids": recs.item_ids.tolist(),
    "scores": recs.scores.tolist(),
    "counts": [recs.num_unknown, recs.num_truncated],
}))
"""


def _run(argv: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """argv in a clean environment: nothing of the development virtualenv leaks in."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (
        f"{result.args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtualenv with genrec-client installed from a clean copy of client/; its bin/ folder."""
    root = tmp_path_factory.mktemp("client_only")
    source = root / "client"  # a copy: building in client/ itself would leave build/ and egg-info there
    shutil.copytree(CLIENT_DIR, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    venv = root / "venv"
    _ok(_run([sys.executable, "-m", "venv", str(venv)], cwd=root))
    _ok(
        _run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(source)],
            cwd=root,
            timeout=INSTALL_TIMEOUT_S,
        )
    )
    return venv / "bin"


@pytest.fixture(scope="module")
def history(tiny_checkpoint: Path) -> list[int]:
    """A few raw item ids the served model knows."""
    _, meta = load_checkpoint(tiny_checkpoint)
    return [int(i) for i in meta.item_raw_ids[[4, 16, 32, 1, 70]]]


@pytest.mark.parametrize("server", ["torch"], indirect=True)  # the client is the same for every runtime
def test_installed_client_needs_no_torch(client_venv: Path, server: TritonServer, history: list[int]) -> None:
    root = client_venv.parent.parent
    python = str(client_venv / "python")
    no_torch = _run([python, "-c", "import torch"], cwd=root)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr

    probe = json.loads(_ok(_run([python, "-c", PROBE, server.url, ",".join(map(str, history))], cwd=root)))
    venv = client_venv.parent
    assert Path(probe["client_file"]).is_relative_to(venv)  # the installed copy, not client/ of the repo
    assert probe["genrec_file"] is None and all(Path(p).is_relative_to(venv) for p in probe["genrec_path"])
    assert not probe["training"]  # genrec is a namespace package holding only the client
    assert "genrec/client/__init__.py" in probe["files"] and "genrec/__init__.py" not in probe["files"]
    assert {f"genrec/client/{m}.py" for m in ("aio", "cli", "client", "protocol", "wire")} <= set(
        probe["files"]
    )
    assert '"editable": true' not in (probe["direct_url"] or "")

    cli = _run(
        [
            str(client_venv / "genrec-client"),
            "recommend",
            "--url",
            server.url,
            "--items",
            ",".join(map(str, history)),
            "-k",
            "5",
            "--json",
        ],
        cwd=root,
    )
    payload = json.loads(_ok(cli))

    with RecommendClient(server.url, timeout_s=60) as client:
        expected = client.recommend(history, k=5)
    assert probe["item_ids"] == expected.item_ids.tolist()
    np.testing.assert_allclose(probe["scores"], expected.scores, rtol=1e-5, atol=1e-5)
    assert probe["counts"] == [expected.num_unknown, expected.num_truncated] == [0, 0]
    assert [item["item_id"] for item in payload["items"]] == expected.item_ids.tolist()
    np.testing.assert_allclose(
        [item["score"] for item in payload["items"]], expected.scores, rtol=1e-5, atol=1e-5
    )
    assert [payload["num_unknown"], payload["num_truncated"]] == [0, 0]
