"""Serving needs only genrec's core dependencies, what a slim serving image installs: in a fresh interpreter
where every module of the `train` extra (pandas, pyarrow, matplotlib, onnx, tqdm) fails to import, every
Python-backend model of a built repository loads from its own config and answers, for the torch and the onnx
runtime. (A real server cannot carry the block: its Python-backend stubs receive PYTHONPATH but did not run
a sitecustomize from it, measured with a mark file.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from genrec import extras
from genrec.builders import handlers as h
from genrec.builders.build import BuildConfig, build_repository
from genrec.client import protocol
from genrec.training.checkpoint import load_meta

SERVE_EVERY_MODEL = r"""
import json, sys
blocked, repository, history = json.loads(sys.argv[1])
for name in blocked:
    sys.modules[name] = None  # import raises ModuleNotFoundError
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from genrec.builders import handlers as h
from genrec.client import protocol

models = {}
for path in sorted(Path(repository).glob("*/config.pbtxt")):
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    if config.platform != "ensemble":
        parameters = {key: value.string_value for key, value in config.parameters.items()}
        version = max(int(p.name) for p in path.parent.iterdir() if p.name.isdigit())
        models[config.name] = h.load_handler(parameters["handler"], path.parent / str(version), parameters)

items = np.array([history], np.int64)
events = {protocol.HISTORY_ITEM_IDS: items, protocol.HISTORY_TIMESTAMPS: 1_000 + np.arange(items.size)[None],
          protocol.HISTORY_ACTIONS: np.zeros_like(items)}
top = {protocol.K: np.array([[3]], np.int32), protocol.EXCLUDE_SEEN: np.array([[True]])}
answers = {
    "recommend": models["recommender"].execute([{**events, **top}])[0],
    "rank": models["recommender"].execute([{**events, protocol.CANDIDATE_ITEM_IDS: items}])[0],
}
encoded = models["user_encoder"].execute([{**events, **top}])[0]
answers["user_encoder"] = encoded
if isinstance(encoded, dict):
    user = encoded[h.USER_EMBEDDING]
    answers["retrieve"] = models["item_retrieval"].execute([{**events, **top, h.USER_EMBEDDING: user}])[0]
    kv = {name: encoded[name] for name in (h.USER_EMBEDDING, h.KV_KEYS, h.KV_VALUES, h.KV_TIMESTAMPS)}
    answers["candidate_scorer"] = models["candidate_scorer"].execute([{**kv, protocol.CANDIDATE_ITEM_IDS: items}])[0]
    scores = answers["candidate_scorer"]
    if isinstance(scores, dict):
        answers["top_n"] = models["top_n"].execute([{protocol.K: top[protocol.K], h.RETRIEVED_ITEM_IDS: items,
                                                     h.CANDIDATE_SCORES: scores[protocol.SCORES]}])[0]
loaded = sorted({name.split(".")[0] for name, module in sys.modules.items() if module is not None} & set(blocked))
print(json.dumps({"models": sorted(models), "loaded": loaded,
                  "answers": {name: sorted(a) if isinstance(a, dict) else repr(a) for name, a in answers.items()}}))
"""


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_served_models_need_nothing_from_the_train_extra(runtime: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    blocked = extras.modules("train")
    assert {"pandas", "pyarrow", "matplotlib", "onnx"} <= blocked, blocked  # read from the installed metadata
    repository = tmp_path / "repository"
    build_repository(BuildConfig(checkpoint=tiny_checkpoint, repository=repository, runtime=runtime))
    history = load_meta(tiny_checkpoint).item_raw_ids[:6].tolist()

    argument = json.dumps([sorted(blocked), str(repository), history])
    run = subprocess.run([sys.executable, "-c", SERVE_EVERY_MODEL, argument], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["models"] == ["candidate_scorer", "item_retrieval", "recommender", "top_n", "user_encoder"]
    assert report["loaded"] == []
    answers = report["answers"]  # each model's output names, or its error
    expected = {"recommend": {protocol.ITEM_IDS, protocol.SCORES}, "rank": {protocol.SCORES},
                "user_encoder": {h.USER_EMBEDDING, h.KV_KEYS, h.KV_VALUES, h.KV_TIMESTAMPS},
                "retrieve": {h.RETRIEVED_ITEM_IDS, h.RETRIEVED_SCORES}, "candidate_scorer": {protocol.SCORES},
                "top_n": {protocol.ITEM_IDS, protocol.SCORES}}
    for name, outputs in expected.items():
        assert isinstance(answers.get(name), list) and outputs <= set(answers[name]), (name, answers.get(name))


def test_a_missing_extra_is_named_by_the_cli(tmp_path: Path) -> None:
    """`genrec train` on a serving-only install: one line naming the extra, exit 1, no traceback."""
    code = (
        "import sys\n"
        "sys.modules['pandas'] = None\n"
        "from genrec.cli import main\n"
        f"sys.exit(main(['train', '--epochs', '1', '--out', {str(tmp_path / 'run')!r}]))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 1, run.stderr[-2000:]
    assert "genrec train needs pandas, which comes with genrec's 'train' extra: pip install 'genrec[train]'" in run.stderr
    assert "Traceback" not in run.stderr
