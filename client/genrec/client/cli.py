"""genrec-client: ask a running genrec server for recommendations from the command line.

genrec-client ready --url localhost:8001
genrec-client recommend --items 50,172,133 -k 5
genrec-client rank --items 50,172,133 --candidates 1,2,3 --json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .client import RecommendClient
from .errors import GenrecError
from .types import Ranking, Recommendations, ScoredItem


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genrec-client",
        description="Query the genrec ensembles (recommend, rank, retrieve) served by Triton over gRPC.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", default="localhost:8001", help="Triton's gRPC address (default: %(default)s)"
    )
    common.add_argument(
        "--timeout", type=float, default=10.0, help="seconds per attempt (default: %(default)s)"
    )
    history = argparse.ArgumentParser(add_help=False, parents=[common])
    history.add_argument(
        "--items",
        type=_int_list,
        required=True,
        help="the user's history: raw item ids, oldest first (1,2,3)",
    )
    history.add_argument(
        "--timestamps",
        type=_int_list,
        help="unix seconds per item, non-decreasing (default: all now, so the model sees no time gaps)",
    )
    history.add_argument(
        "--actions", type=_int_list, help="action/rating code per item, >= 0 (default: 0 = unknown)"
    )
    history.add_argument("--json", action="store_true", help="print JSON instead of a table")
    top_k = argparse.ArgumentParser(add_help=False)
    top_k.add_argument("-k", type=int, default=10, help="how many items (default: %(default)s)")
    top_k.add_argument(
        "--include-seen", action="store_true", help="allow items already in the history in the results"
    )

    verbs = parser.add_subparsers(dest="verb", required=True, metavar="{recommend,rank,retrieve,ready}")
    verbs.add_parser(
        "recommend",
        parents=[history, top_k],
        help="top-k items: retrieval, then re-ranking",
        description="The k best items for a history: retrieval, then re-ranking.",
    )
    verbs.add_parser(
        "retrieve",
        parents=[history, top_k],
        help="top-k items by the retrieval score alone",
        description="The k best items by the retrieval score alone.",
    )
    rank = verbs.add_parser(
        "rank",
        parents=[history],
        help="score the given candidate items",
        description="One score per candidate item; printed best first.",
    )
    rank.add_argument("--candidates", type=_int_list, required=True, help="raw item ids to score (4,5,6)")
    verbs.add_parser(
        "ready",
        parents=[common],
        help="exit 0 when the server and the three ensembles are ready",
        description="Exit 0 when the server is live and recommend, rank and retrieve are ready, else 1.",
    )
    return parser


def _print_items(items: Sequence[ScoredItem], num_unknown: int, num_truncated: int, as_json: bool) -> None:
    if as_json:
        payload = {
            "items": [{"item_id": item.item_id, "score": item.score} for item in items],
            "num_unknown": num_unknown,
            "num_truncated": num_truncated,
        }
        print(json.dumps(payload))
        return
    print(f"{'rank':>4}  {'item_id':>12}  {'score':>10}")
    for position, item in enumerate(items, start=1):
        print(f"{position:>4}  {item.item_id:>12}  {item.score:>10.4f}")
    if num_unknown or num_truncated:
        print(f"history: {num_unknown} unknown ids ignored, {num_truncated} oldest events truncated")


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2), already printed by argparse
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        with RecommendClient(args.url, timeout_s=args.timeout) as client:
            if args.verb == "ready":
                ready = client.ready()
                print("ready" if ready else f"not ready: {args.url}")
                return 0 if ready else 1
            result: Recommendations | Ranking
            if args.verb == "rank":
                result = client.rank(
                    args.items, args.candidates, timestamps=args.timestamps, actions=args.actions
                )
                items = result.ordered()
            else:
                method = client.recommend if args.verb == "recommend" else client.retrieve
                result = method(
                    args.items,
                    args.k,
                    timestamps=args.timestamps,
                    actions=args.actions,
                    exclude_seen=not args.include_seen,
                )
                items = result.items
    except GenrecError as err:
        print(f"genrec-client: error: {err}", file=sys.stderr)
        return 1
    _print_items(items, result.num_unknown, result.num_truncated, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
