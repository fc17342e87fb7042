"""The command line: the top-level and every verb's --help exit 0; no verb or a wrong one is a usage error."""

from __future__ import annotations

import json

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


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("genrec ")


@pytest.mark.parametrize("verb", VERBS)
def test_every_flag_has_help_and_shows_its_default(verb: str) -> None:
    parser, _ = build_parser()
    (verbs,) = [a for a in parser._actions if a.dest == "verb"]
    sub = verbs.choices[verb]
    formatter = sub._get_formatter()
    for action in sub._actions:
        assert action.help, f"{verb} {action.option_strings or action.dest} has no help"
        if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
            shown = formatter._expand_help(action)
            assert "default" in shown.lower(), f"{verb} {action.option_strings[-1]}: no default in {shown!r}"


def test_bench_runs_the_named_benchmark(monkeypatch: pytest.MonkeyPatch) -> None:
    import genrec.benchmarks.kv_cache as kv_cache

    calls = []
    monkeypatch.setattr(kv_cache, "main", lambda argv: calls.append(argv))
    assert main(["bench", "kv_cache", "--quick", "--", "--threads", "1"]) == 0
    assert calls == [["--quick", "--threads", "1"]]


def test_eval_finds_the_data_the_checkpoint_was_trained_on(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    train = ["train", "--data", "synthetic", "--preset", "tiny", "--epochs", "1", "--min-epochs", "0",
             "--out", str(out), "--no-progress", "--min-user-interactions", "30"]
    assert main(train) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "checkpoint"), "--json"]) == 0  # no --data: the recorded one
    recorded = json.loads(capsys.readouterr().out)
    explicit = ["eval", "--checkpoint", str(out / "checkpoint"), "--json", "--data", "synthetic",
                "--min-user-interactions", "30"]
    assert main(explicit) == 0
    assert json.loads(capsys.readouterr().out) == recorded
    (out / "checkpoint" / "data_config.json").rename(tmp_path / "moved.json")
    assert main(["eval", "--checkpoint", str(out / "checkpoint")]) == 1  # nothing recorded: said, not a traceback
    assert "does not record its data (data_config.json): pass --data" in capsys.readouterr().err
    with pytest.raises(ValueError, match="trained on other data"):  # ml-100k is not what it was trained on
        main(["eval", "--checkpoint", str(out / "checkpoint"), "--data", "ml-100k"])
