"""The command line: the top-level and every verb's --help exit 0; no verb or a wrong one is a usage error."""

from __future__ import annotations

import json
from pathlib import Path

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


def _args(*argv: str):
    parser, _ = build_parser()
    return parser.parse_args(list(argv))


def test_flag_defaults_are_the_config_defaults(tmp_path) -> None:
    """A flag's default and its config field's default are written in two places; this keeps them one."""
    from genrec.args import config_from_args
    from genrec.builders.build import BuildConfig
    from genrec.builders.rollout import RolloutConfig
    from genrec.builders.serve import server_config
    from genrec.builders.tritonserver import ServerConfig
    from genrec.cli import build_config, data_config, train_config
    from genrec.training.prepare import DataConfig
    from genrec.training.trainer import TrainConfig

    assert train_config(_args("train")) == TrainConfig()
    assert data_config(_args("train")) == DataConfig()
    assert build_config(_args("build", "--checkpoint", "c")) == BuildConfig(checkpoint=Path("c"))
    key = tmp_path / "key"
    key.write_text("k")
    assert server_config(_args("serve", "--admin-key-file", str(key))) == ServerConfig(
        repository=Path("model_repository"), admin_key="k"
    )
    assert config_from_args(RolloutConfig, _args("rollout")) == RolloutConfig(Path("model_repository"))


def test_every_flag_reaches_its_config(tmp_path) -> None:
    from genrec.builders.build import BuildConfig
    from genrec.builders.serve import server_config
    from genrec.builders.tritonserver import ServerConfig
    from genrec.cli import build_config, train_config
    from genrec.training.losses import LossConfig
    from genrec.training.metrics import EvalConfig
    from genrec.training.popularity import PopularityConfig
    from genrec.training.trainer import TrainConfig

    train = _args("train", "--model", "sasrec", "--preset", "tiny", "--max-len", "7", "--epochs", "3",
                  "--batch-size", "5", "--lr", "0.1", "--loss", "sampled", "--high-rating", "2", "--patience", "4",
                  "--min-epochs", "1", "--max-minutes", "2", "--seed", "9", "--device", "cpu", "--keep-history",
                  "--no-popularity", "--out", "o", "--resume", "--no-progress")
    assert train_config(train) == TrainConfig(
        model="sasrec", preset="tiny", max_len=7, epochs=3, batch_size=5, lr=0.1,
        loss=LossConfig(kind="sampled", high_rating=2.0, exclude_seen=False), patience=4, min_epochs=1,
        max_minutes=2.0, seed=9,
        device="cpu", eval=EvalConfig(exclude_history=False), popularity=PopularityConfig(enabled=False),
        out=Path("o"), resume=True, progress=False,
    )
    build = _args("build", "--checkpoint", "c", "--repository", "r", "--runtime", "onnx", "--retrieve-k", "7",
                  "--max-batch-size", "3", "--instances", "2", "--device", "cuda", "--no-dynamic-batching",
                  "--faiss", "ivf", "--threads", "3", "--user-cache-mb", "0", "--user-cache-ttl-s", "5",
                  "--window-block", "4", "--max-history-events", "10", "--max-candidates", "20")
    assert build_config(build) == BuildConfig(
        checkpoint=Path("c"), repository=Path("r"), runtime="onnx", retrieve_k=7, max_batch_size=3, instances=2,
        device="cuda", dynamic_batching=False, faiss="ivf", threads=3, user_cache_mb=0.0, user_cache_ttl_s=5.0,
        window_block=4, max_history_events=10, max_candidates=20,
    )
    key = tmp_path / "key"
    key.write_text("k")
    serve = _args("serve", "--repository", "r", "--host", "0.0.0.0", "--grpc-port", "1", "--http-port", "2",
                  "--metrics-port", "3", "--model-control", "poll", "--log-file", "l", "--log-verbose", "1",
                  "--admin-key-file", str(key), "--tls-cert", "c.pem", "--tls-key", "k.pem")
    assert server_config(serve) == ServerConfig(
        repository=Path("r"), host="0.0.0.0", grpc_port=1, http_port=2, metrics_port=3, model_control="poll",
        log_file=Path("l"), log_verbose=1, admin_key="k", tls_cert=Path("c.pem"), tls_key=Path("k.pem"),
    )
