"""locust, headless, against a served repository: ``benchmarks/locustfile.py`` (RecommendClient) for a fixed
time, its CSV read back."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from genrec.benchmarks.common import (
    REPO_ROOT,
)
from genrec.benchmarks.servers import shown

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


@dataclass(frozen=True)
class LocustResult:
    users: int
    seconds: int
    requests: int
    failures: int
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    command: str
    killed: bool = False  # locust hung past its run and was killed; its statistics are as last written


def locust_args(url: str, users: int, seconds: int, csv_prefix: Path) -> list[str]:
    return [
        "-f",
        str(shown(LOCUSTFILE)),
        "--headless",
        "-u",
        str(users),
        "-r",
        str(users),
        "-t",
        f"{seconds}s",
        "--host",
        f"grpc://{url}",
        "--csv",
        str(csv_prefix),
        "--only-summary",
        "--reset-stats",
        "--stop-timeout",
        "15",
    ]


LOCUST_REQUEST_TIMEOUT_S = 10  # per recommend call; a slower one counts as a failure
LOCUST_GRACE_S = 90  # past the run's duration, before locust is killed as hung


def run_locust(url: str, histories_json: Path, users: int, seconds: int, raw_dir: Path) -> LocustResult:
    """Headless locust against the server; its statistics of the ``recommend`` requests.

    Bounded: every call has a deadline, and a locust that has not exited ``LOCUST_GRACE_S`` after its run
    ended is killed; whatever statistics it wrote are still read (the report says it was killed).
    """
    prefix = raw_dir / "locust"
    args = locust_args(url, users, seconds, prefix)
    env = {**os.environ, "GENREC_HISTORIES": str(histories_json), "GENREC_TIMEOUT_S": str(LOCUST_REQUEST_TIMEOUT_S)}
    process = subprocess.Popen(
        [sys.executable, "-m", "locust", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    killed = False
    try:
        output, _ = process.communicate(timeout=seconds + LOCUST_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        output, _ = process.communicate()
        killed = True
    (raw_dir / "locust.log").write_text(output)
    stats = Path(f"{prefix}_stats.csv")
    if not stats.exists():
        raise RuntimeError(
            f"locust wrote no statistics (exit {process.returncode}{', killed' if killed else ''}):\n{output[-3000:]}"
        )
    with stats.open() as f:
        rows = [r for r in csv.DictReader(f) if r["Name"] == "recommend"]
    if not rows:
        raise RuntimeError(f"locust recorded no 'recommend' requests:\n{output[-3000:]}")
    row = rows[0]
    return LocustResult(
        users=users,
        seconds=seconds,
        requests=int(row["Request Count"]),
        failures=int(row["Failure Count"]),
        requests_per_s=float(row["Requests/s"]),
        p50_ms=float(row["50%"]),
        p95_ms=float(row["95%"]),
        p99_ms=float(row["99%"]),
        max_ms=float(row["Max Response Time"]),
        command=f"GENREC_HISTORIES={shown(histories_json)} GENREC_TIMEOUT_S={LOCUST_REQUEST_TIMEOUT_S} locust "
        + " ".join(locust_args("127.0.0.1:PORT", users, seconds, shown(prefix))),
        killed=killed,
    )


# ---- Triton vs in-process ---------------------------------------------------------------------------------
