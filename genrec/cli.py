"""The `genrec` command line: train, eval, build, serve, rollout, demo, bench.

Each verb builds a typed config from its flags and calls library code; `main(argv)` is callable from tests.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from genrec.args import HelpFormatter, config_from_args
from genrec.extras import missing_extra_message

Handler = Callable[[argparse.Namespace], int]


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        default=None,
        help="'ml-100k' (bundled real data), 'synthetic', a MovieLens ratings.dat / ratings.csv, "
        "or any .csv / .parquet log (see --user-col etc.). Default: train: ml-100k; eval: the data the "
        "checkpoint records (its data_config.json, with its columns and filter)",
    )
    group.add_argument("--user-col", default="user_id", help="user column of a generic table")
    group.add_argument("--item-col", default="item_id", help="item column of a generic table")
    group.add_argument("--time-col", default="timestamp",
                       help="timestamp column (unix seconds or datetimes); 'none': the log has no time, each "
                       "user's events are in file order, and HSTU learns no time bias or popularity from it")
    group.add_argument("--rating-col", default=None, help="optional rating/action column")
    group.add_argument("--min-user-interactions", type=int, default=5, help="drop users with fewer events")


def data_config(args: argparse.Namespace):
    """The data flags (train, eval) as a DataConfig."""
    from genrec.training.datasets import ColumnMapping
    from genrec.training.prepare import DataConfig
    from genrec.training.sequences import PreprocessConfig

    return DataConfig(
        source=args.data or "ml-100k",
        columns=ColumnMapping(args.user_col, args.item_col, None if args.time_col == "none" else args.time_col,
                              args.rating_col),
        preprocess=PreprocessConfig(min_user_interactions=args.min_user_interactions),
    )


def train_config(args: argparse.Namespace):
    """`genrec train`'s flags as a TrainConfig."""
    from genrec.training.losses import LossConfig
    from genrec.training.metrics import EvalConfig
    from genrec.training.popularity import PopularityConfig
    from genrec.training.trainer import TrainConfig

    return config_from_args(
        TrainConfig, args, loss=LossConfig(kind=args.loss, high_rating=args.high_rating, exclude_seen=not args.keep_history,
                                      tied_targets=not args.ordered_ties, horizon=args.horizon),
        progress=not args.no_progress, eval=EvalConfig(exclude_history=not args.keep_history),
        popularity=PopularityConfig(enabled=not args.no_popularity),
    )


def build_config(args: argparse.Namespace):
    """`genrec build`'s flags as a BuildConfig."""
    from genrec.builders.build import BuildConfig

    return config_from_args(BuildConfig, args, dynamic_batching=not args.no_dynamic_batching)


def _add_train(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser(
        "train",
        help="train HSTU (or SASRec) and write a checkpoint",
        description="Train a generative recommender on an interaction log with leave-one-out evaluation. "
        "Writes <out>/checkpoint (weights, config, vocabulary, metrics) and <out>/metrics.csv per epoch. "
        "Multi-GPU / multi-node: run under `torchrun --nproc_per_node N -m genrec.cli train ...`.",
    )
    _add_data_arguments(p)
    g = p.add_argument_group("model and optimisation")
    g.add_argument("--model", choices=["hstu", "sasrec"], default="hstu", help="architecture")
    g.add_argument("--preset", choices=["paper", "reference", "tiny"], default="paper",
                   help="sizes: paper = HSTU paper's MovieLens setting (d=50, 2 layers), reference = d=128, "
                   "4 layers, 8 heads, length 512; tiny = seconds on a laptop")
    g.add_argument("--max-len", type=int, default=None, help="override the preset's maximum history length")
    g.add_argument("--epochs", type=int, default=101, help="at most (Meta's ML-1M recipe: 101)")
    g.add_argument("--batch-size", type=int, default=128, help="users per optimiser step")
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    g.add_argument("--loss", choices=["auto", "full", "sampled"], default="auto",
                   help="full: softmax over the whole catalogue (SASRec+); sampled: sampled softmax with 128 "
                   "uniform negatives (the HSTU paper's); auto (default): full up to 100,000 items")
    g.add_argument("--high-rating", type=float, default=None,
                   help="HSTU's second ranking task learns whether the next item is rated >= this (default: the "
                   "upper half of the log's rating scale, 4-5 of 1-5)")
    g.add_argument("--ema-epochs", type=float, default=None,
                   help="validate and keep a moving average of the weights over about this many epochs")
    g.add_argument("--patience", type=int, default=10,
                   help="stop after this many epochs without a better validation NDCG@10 ...")
    g.add_argument("--min-epochs", type=int, default=10, help="... counted only from this epoch on")
    g.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget for training")
    g.add_argument("--seed", type=int, default=0, help="seeds weights, negatives and batch order")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--keep-history", action="store_true",
                   help="keep the user's history items in the full ranking (default: excluded, as the HSTU and "
                   "SASRec papers evaluate), and in the retrieval loss's softmax")
    g.add_argument("--ordered-ties", action="store_true",
                   help="take the log's order among a user's events with the same timestamp as real (default: "
                   "they are one set, each a target of the position before them)")
    g.add_argument("--horizon", type=int, default=1,
                   help="a position's targets reach this many events ahead, the later ones sharing part of its "
                   "weight (LossConfig.later_weight); 1 (default): the next event alone, as the papers train")
    g.add_argument("--no-popularity", action="store_true",
                   help="HSTU's ranking head without the candidates' recent-popularity features")
    g.add_argument("--out", type=Path, default=Path("runs/hstu"), help="run folder (checkpoint, metrics.csv)")
    g.add_argument("--resume", action="store_true", help="continue from <out>/trainer_state.pt")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (plain lines when not a terminal)")

    def run(args: argparse.Namespace) -> int:
        from genrec.training.prepare import run_training

        metrics = run_training(data_config(args), train_config(args))
        from genrec.training.report import print_metrics

        print_metrics(metrics)
        print(f"checkpoint: {args.out / 'checkpoint'}")
        return 0

    return run


def _add_eval(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser("eval", help="evaluate a checkpoint on its data's leave-one-out test split",
                       description="Full-ranking and sampled (100 negatives) metrics of a checkpoint; "
                       "for HSTU also the two-stage pipeline (retrieve, then re-rank).")
    p.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint folder (<out>/checkpoint)")
    _add_data_arguments(p)
    p.add_argument("--keep-history", action="store_true", help="keep history items in the full ranking")
    p.add_argument("--split", choices=["test", "valid"], default="test", help="which held-out event is the target")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    def run(args: argparse.Namespace) -> int:
        from genrec.training.prepare import DataConfig, evaluate_checkpoint
        from genrec.training.report import print_metrics

        try:
            data = data_config(args) if args.data is not None else DataConfig.load(args.checkpoint)
        except FileNotFoundError as error:  # a checkpoint from before data_config.json, or no checkpoint
            print(f"genrec eval: {error}", file=sys.stderr)
            return 1
        metrics = evaluate_checkpoint(args.checkpoint, data, args.split, not args.keep_history)
        print(json.dumps(metrics, indent=2)) if args.json else print_metrics(metrics)
        return 0

    return run


def _add_build(sub: argparse._SubParsersAction) -> Handler:
    from genrec.builders.limits import DEFAULT_USER_CACHE_MB, Limits

    p = sub.add_parser("build", help="turn a checkpoint into a Triton model repository",
                       description="Write recommender (recommend and rank, with the per-user K/V cache), "
                       "user_encoder, item_retrieval, candidate_scorer, top_n and the recommend / rank / retrieve "
                       "ensembles. A new build of the same model adds a version.")
    p.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint folder (<out>/checkpoint)")
    p.add_argument("--repository", type=Path, default=Path("model_repository"), help="the model repository")
    p.add_argument("--runtime", choices=["torch", "onnx", "tensorrt"], default="torch",
                   help="what runs the model inside the served Python models (tensorrt: a CUDA GPU)")
    p.add_argument("--retrieve-k", type=int, default=100, help="retrieval depth before re-ranking")
    p.add_argument("--max-batch-size", type=int, default=64, help="requests Triton may batch into one execution")
    p.add_argument("--instances", type=int, default=1, help="model instances per composing model")
    p.add_argument("--device", default="cpu", help="cpu or cuda: where the torch / onnx models run")
    p.add_argument("--no-dynamic-batching", action="store_true", help="execute every request on its own")
    p.add_argument("--faiss", choices=["none", "ivf", "hnsw"], default="none",
                   help="approximate retrieval index for large catalogues (default: exact brute force)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per served model process (default: 0, torch's choice: one per core)")
    cache = p.add_argument_group("user cache (recommend / rank calls that name a user_id; torch runtime only)")
    cache.add_argument("--user-cache-mb", type=float, default=None,
                       help=f"memory for cached users' K/V (default: {DEFAULT_USER_CACHE_MB:g} with the torch "
                       "runtime, 0 = off; README 'Sizing the user cache')")
    cache.add_argument("--user-cache-ttl-s", type=float, default=0.0,
                       help="forget a user this long after their last request (default: 0, LRU eviction only)")
    cache.add_argument("--window-block", type=int, default=None,
                       help="histories longer than max_len lose their oldest events this many at a time, so a "
                       "cached user is recomputed once per that many new events (default: max_len // 8)")
    limits = p.add_argument_group("request limits (over a limit: INVALID_ARGUMENT before any compute)")
    limits.add_argument("--max-history-events", type=int, default=Limits.max_history_events,
                        help="events accepted per request, before truncation to the model's max_len "
                        "(default: %(default)s)")
    limits.add_argument("--max-candidates", type=int, default=Limits.max_candidates,
                        help="candidates per rank request; bounds how long one request holds the scorer "
                        "(default: %(default)s)")

    def run(args: argparse.Namespace) -> int:
        from genrec.builders.build import build_repository

        version = build_repository(build_config(args))
        print(f"built {args.repository} (version {version}, runtime {args.runtime})")
        return 0

    return run


def _add_serve(sub: argparse._SubParsersAction) -> Handler:
    from genrec.builders import serve

    p = sub.add_parser("serve", help="start tritonserver on a model repository",
                       description="Starts the tritonserver on PATH, else the one bundled in the nvidia-pytriton "
                       "wheel; waits until every model is ready; binds to 127.0.0.1 unless --host says otherwise.")
    serve.add_arguments(p)
    return serve.run


def _add_rollout(sub: argparse._SubParsersAction) -> Handler:
    from genrec.builders.tritonserver import default_admin_key_file

    p = sub.add_parser("rollout", help="move a running server to the repository's newest build",
                       description="For a server started with --model-control explicit: reloads the composing "
                       "models, then the ensembles pinned to them, so that no request fails or mixes two builds "
                       "(also across a change of catalogue). Run `genrec build` first.")
    p.add_argument("--repository", type=Path, default=Path("model_repository"), help="the model repository")
    p.add_argument("--url", default="127.0.0.1:8001", help="the server's gRPC address")
    p.add_argument("--admin-key-file", type=Path, default=default_admin_key_file(), help="the key `genrec serve` uses")
    p.add_argument("--tls-cert", type=Path, default=None, help="the server's certificate, if it serves TLS")

    def run(args: argparse.Namespace) -> int:
        from genrec.builders.rollout import RolloutConfig, RolloutError, rollout

        try:
            version = rollout(config_from_args(RolloutConfig, args))
        except RolloutError as error:
            print(f"genrec rollout: {error}", file=sys.stderr)
            return 1
        print(f"{args.url} serves version {version} of {args.repository}")
        return 0

    return run


def _add_demo(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser("demo", help="end to end: train on MovieLens-100K, build, serve, recommend",
                       description="Trains a small HSTU on MovieLens-100K, builds the Triton repository, starts the "
                       "server, calls recommend() for a real user over gRPC and prints the movie titles.")
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"), help="training run and server logs")
    p.add_argument("--repository", type=Path, default=Path("model_repository"), help="the model repository")
    p.add_argument("--epochs", type=int, default=30, help="at most")
    p.add_argument("--max-minutes", type=float, default=4.0, help="training's wall-clock cap")
    p.add_argument("--user", default=None, help="raw user id to recommend for (default: a random test user)")
    p.add_argument("--runtime", choices=["torch", "onnx"], default="torch", help="as for build")

    def run(args: argparse.Namespace) -> int:
        from genrec.demo import DemoConfig, run_demo

        return run_demo(DemoConfig(workdir=args.workdir, repository=args.repository, epochs=args.epochs,
                                   max_minutes=args.max_minutes, user=args.user, runtime=args.runtime))

    return run


BENCHMARKS = ("serving", "kv_cache", "user_cache", "reliability", "quality", "retrieval", "batching")


def _add_bench(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser("bench", help="the benchmarks: serving, K/V cache, user cache, reliability, quality, ...",
                       description="Runs one of genrec.benchmarks (python -m genrec.benchmarks.<name> is the same), "
                       "which writes its table, plot and JSON under benchmarks/results/. Run nothing else "
                       "meanwhile. `genrec bench NAME -- --help` lists the benchmark's own flags.")
    p.add_argument("name", nargs="?", choices=BENCHMARKS, default="serving", help="which benchmark")
    p.add_argument("--quick", action="store_true", help="the benchmark's smaller, noisier run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="after --: passed on to the benchmark")

    def run(args: argparse.Namespace) -> int:
        import importlib

        passed = [a for a in args.args if a != "--"]
        passed += ["--quick"] if args.quick and "--quick" not in passed else []
        result = importlib.import_module(f"genrec.benchmarks.{args.name}").main(passed)
        return int(result or 0)

    return run


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    parser = argparse.ArgumentParser(
        prog="genrec",
        description="Generative recommendations (HSTU) trained in PyTorch and served by NVIDIA Triton.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="verb", metavar="{train,eval,build,serve,rollout,demo,bench}")
    handlers = {
        "train": _add_train(sub),
        "eval": _add_eval(sub),
        "build": _add_build(sub),
        "serve": _add_serve(sub),
        "rollout": _add_rollout(sub),
        "demo": _add_demo(sub),
        "bench": _add_bench(sub),
    }
    for verb in sub.choices.values():
        verb.formatter_class = HelpFormatter
    return parser, handlers


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("genrec")
    except PackageNotFoundError:
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    try:
        return handlers[args.verb](args)
    except ModuleNotFoundError as error:  # a slim (serving-only) install: name the extra, not a traceback
        message = missing_extra_message(error, f"genrec {args.verb}")
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
