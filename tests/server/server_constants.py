"""Settings and records of the servers that tests/server/conftest.py starts, for the tests that use them."""

from pathlib import Path

RETRIEVE_K = 30  # the retrieval depth the test repositories are built with: recommend's k is at most this
WINDOW_BLOCK = 4  # histories beyond max_len lose their oldest events 4 at a time (window_start)
MAX_QUEUE_DELAY_US = 20_000  # dynamic batching waits up to 20 ms, so concurrent requests share batches

# Each served repository's files (path -> size, mtime) as its build left them, before the server loaded it.
BUILT_FILES: dict[Path, dict[str, tuple[int, int]]] = {}


def repository_files(repository: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(repository)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(repository.rglob("*")) if p.is_file()}
