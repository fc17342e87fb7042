"""The command line: the top-level and every verb's --help exit 0; no verb or a wrong one is a usage error."""

from __future__ import annotations

import pytest

from genrec.cli import build_parser, main

VERBS = ["train", "eval", "build", "serve", "rollout", "demo", "bench"]


def test_top_level_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: genrec")
    for verb in VERBS:
        assert verb in out


@pytest.mark.parametrize("verb", VERBS)
def test_verb_help(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: genrec {verb}")


def test_every_verb_has_a_handler() -> None:
    _, handlers = build_parser()
    assert sorted(handlers) == sorted(VERBS)


def test_no_verb_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: genrec" in capsys.readouterr().out


def test_unknown_verb_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fly"])
    assert exit_info.value.code == 2
