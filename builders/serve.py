"""genrec serve: run tritonserver on a model repository in the foreground until Ctrl-C."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from genrec.builders.tritonserver import (
    ADMIN_HEADER,
    GRPC_ADMIN_HEADER,
    ServerConfig,
    ServerError,
    default_admin_key_file,
    read_or_create_admin_key,
    serve,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServerConfig(repository=Path("model_repository"))
    parser.add_argument(
        "--repository",
        type=Path,
        default=defaults.repository,
        help="the Triton model repository to serve (default: %(default)s)",
    )
    parser.add_argument(
        "--host",
        default=defaults.host,
        help="address to listen on; 0.0.0.0 accepts other machines (default: %(default)s)",
    )
    parser.add_argument("--grpc-port", type=int, default=defaults.grpc_port, help="(default: %(default)s)")
    parser.add_argument("--http-port", type=int, default=defaults.http_port, help="(default: %(default)s)")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=defaults.metrics_port,
        help="Prometheus metrics at http://HOST:PORT/metrics (default: %(default)s)",
    )
    parser.add_argument(
        "--model-control",
        choices=("none", "explicit", "poll"),
        default=defaults.model_control,
        help="none: load every model at start; explicit: also accept load/unload requests; "
        "poll: reload models whose files change (default: %(default)s)",
    )
    parser.add_argument(
        "--log-file",
        type=Path,
        default=defaults.log_file,
        help="where the server's output goes (default: a new temporary file, printed at start)",
    )
    parser.add_argument(
        "--log-verbose", type=int, default=defaults.log_verbose, help="Triton's verbosity level (default: 0)"
    )
    parser.add_argument(
        "--admin-key-file",
        type=Path,
        default=default_admin_key_file(),
        help="the key that unlocks Triton's admin protocols (shared memory, model repository, logging, "
        f"trace) as the gRPC header '{GRPC_ADMIN_HEADER}' or the HTTP header '{ADMIN_HEADER}'; created "
        "(mode 0600) with a random key if missing (default: %(default)s)",
    )
    parser.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate: serve gRPC over TLS")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")


def run(args: argparse.Namespace) -> int:
    config = ServerConfig(
        repository=args.repository,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        log_verbose=args.log_verbose,
        model_control=args.model_control,
        log_file=args.log_file,
        admin_key=read_or_create_admin_key(args.admin_key_file),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )
    try:
        return serve(config)
    except ServerError as error:
        print(f"genrec serve: {error}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genrec serve", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
