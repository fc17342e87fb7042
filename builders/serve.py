"""genrec serve: run tritonserver on a model repository in the foreground until Ctrl-C."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from genrec.args import HelpFormatter, config_from_args
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
    add = parser.add_argument
    add("--repository", type=Path, default=defaults.repository, help="the Triton model repository to serve")
    add("--host", default=defaults.host, help="address to listen on; 0.0.0.0 accepts other machines")
    add("--grpc-port", type=int, default=defaults.grpc_port, help="where clients call")
    add("--http-port", type=int, default=defaults.http_port, help="Triton's HTTP/REST endpoint")
    add("--metrics-port", type=int, default=defaults.metrics_port, help="Prometheus metrics at http://HOST:PORT/metrics")
    add("--model-control", choices=("none", "explicit", "poll"), default=defaults.model_control,
        help="none: load every model at start; explicit: also accept load/unload requests; "
        "poll: reload models whose files change")
    add("--log-file", type=Path, default=defaults.log_file,
        help="where the server's output goes (default: a new temporary file, printed at start)")
    add("--log-verbose", type=int, default=defaults.log_verbose, help="Triton's verbosity level")
    add("--admin-key-file", type=Path, default=default_admin_key_file(),
        help="the key that unlocks Triton's admin protocols (shared memory, model repository, logging, "
        f"trace) as the gRPC header '{GRPC_ADMIN_HEADER}' or the HTTP header '{ADMIN_HEADER}'; created "
        "(mode 0600) with a random key if missing")
    add("--tls-cert", type=Path, default=None, help="PEM certificate: serve gRPC over TLS")
    add("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")


def server_config(args: argparse.Namespace) -> ServerConfig:
    return config_from_args(ServerConfig, args, admin_key=read_or_create_admin_key(args.admin_key_file))


def run(args: argparse.Namespace) -> int:
    try:
        return serve(server_config(args))
    except ServerError as error:
        print(f"genrec serve: {error}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genrec serve", description=__doc__, formatter_class=HelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
