"""genrec-client without a server: --help reads well, usage and input errors are clean.

Its results (table, JSON, ready) against a real server: tests/server/test_client_e2e.py.
"""

from __future__ import annotations

import pytest

from genrec.client.cli import main


@pytest.mark.parametrize(
    "argv", [["--help"], ["recommend", "--help"], ["rank", "-h"], ["retrieve", "-h"], ["ready", "-h"]]
)
def test_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: genrec-client")
    assert argv == ["--help"] or "--url" in out


def test_top_level_help_lists_the_verbs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in ("recommend", "rank", "retrieve", "ready"):
        assert verb in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required"),
        (["bogus"], "invalid choice: 'bogus'"),
        (["recommend"], "the following arguments are required: --items"),
        (["recommend", "--items", "1,x"], "argument --items: expected comma-separated integers, got '1,x'"),
        (["recommend", "--items", "1", "-k", "two"], "argument -k: invalid int value: 'two'"),
        (["rank", "--items", "1,2"], "the following arguments are required: --candidates"),
    ],
)
def test_usage_errors_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_input_exits_1_with_the_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "--url", "127.0.0.1:1", "--items", "1,2", "-k", "0"]) == 1
    assert (
        capsys.readouterr().err.strip()
        == "genrec-client: error: k must be a positive integer (at most 2147483647), got 0"
    )
    assert (
        main(["rank", "--url", "127.0.0.1:1", "--items", "1,2", "--timestamps", "5,4", "--candidates", "3"])
        == 1
    )
    assert "timestamps must be non-decreasing" in capsys.readouterr().err
