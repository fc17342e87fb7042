"""genrec-client: --help reads well, usage errors are clean, results print as a table or JSON."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest

from genrec.client.cli import main

if TYPE_CHECKING:
    from conftest import StubTriton


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


def test_recommend_json(stub: StubTriton, stub_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "--url", stub_url, "--items", "1,2", "-k", "3", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [item["item_id"] for item in payload["items"]] == [3, 4, 5]
    assert payload["num_unknown"] == 0 and payload["num_truncated"] == 0


def test_rank_table_is_best_first(
    stub: StubTriton, stub_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["rank", "--url", stub_url, "--items", "1,2,99999", "--candidates", "7,13,9"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "item_id", "score"]
    assert [line.split()[1] for line in lines[1:4]] == ["13", "9", "7"]  # stub scores id % 7
    assert lines[4] == "history: 1 unknown ids ignored, 0 oldest events truncated"


def test_ready(stub: StubTriton, stub_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ready", "--url", stub_url]) == 0
    assert capsys.readouterr().out.strip() == "ready"
    stub.live = False
    assert main(["ready", "--url", stub_url]) == 1
    assert capsys.readouterr().out.strip() == f"not ready: {stub_url}"
