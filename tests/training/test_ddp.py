"""Multi-process training: `torchrun --nproc_per_node 2 -m genrec.cli train` on CPU (gloo).

The command line is run as users run it, through a two-line launcher that also records each rank's final
weights (the trainer's own `test_metrics` is wrapped to save the model it is handed), so that the test can
check that DDP kept the ranks' parameters identical, not only that rank 0 wrote a checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

LAUNCHER = '''
import os, sys, torch
import genrec.training.trainer as trainer
from genrec.cli import main

measure = trainer.test_metrics

def recording(model, test, config):
    torch.save(model.state_dict(), config.out / f"rank{os.environ['RANK']}_final.pt")
    return measure(model, test, config)

trainer.test_metrics = recording
sys.exit(main(sys.argv[1:]))
'''


def test_two_process_ddp_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "run"
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [
        str(torchrun), "--standalone", "--nproc_per_node", "2", str(launcher),
        "train", "--data", "synthetic", "--preset", "tiny", "--epochs", "2", "--batch-size", "64",
        "--out", str(out), "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]

    # one process group of two: rank 0 announces it, and only rank 0 writes
    assert "on cpu x2" in log, log[-4000:]
    assert log.count("training hstu") == 1
    assert (out / "checkpoint" / "metrics.json").is_file()
    metrics = json.loads((out / "checkpoint" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2

    # every rank ended with the same weights, and they are the checkpoint's
    rank0 = torch.load(out / "rank0_final.pt", weights_only=True)
    rank1 = torch.load(out / "rank1_final.pt", weights_only=True)
    saved = load_file(str(out / "checkpoint" / "model.safetensors"))
    assert rank0.keys() == rank1.keys() == saved.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
        assert torch.equal(rank0[name], saved[name]), name
    # without the all-reduce the ranks, which train on different batches, would have drifted apart
    lines = (out / "metrics.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("epoch,train_loss")  # header + one row per epoch, rank 0 only
