#!/bin/sh
# The server image's command: tritonserver on /models with Triton's admin protocols behind a key.
#
# The key is read from $GENREC_ADMIN_KEY_FILE (default /run/secrets/genrec-admin-key: mount a Docker or
# Kubernetes secret there to use `genrec rollout` or other admin calls); without one, a random key that
# nobody knows locks them for the container's life. The restricted list is
# genrec.builders.tritonserver.ADMIN_PROTOCOLS (tests/builders/test_docker_files.py keeps the two equal).
# Extra arguments are passed to tritonserver.
set -eu
RESTRICTED="shared-memory,model-repository,logging,trace"
KEY_FILE="${GENREC_ADMIN_KEY_FILE:-/run/secrets/genrec-admin-key}"
if [ -r "$KEY_FILE" ]; then
    KEY="$(tr -d ' \t\r\n' < "$KEY_FILE")"
else
    KEY="$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"
fi
exec tritonserver \
    --model-repository=/models \
    --strict-readiness=true \
    --exit-on-error=true \
    --log-verbose=0 \
    --exit-timeout-secs=30 \
    --http-port=8000 \
    --grpc-port=8001 \
    --allow-metrics=true \
    --allow-gpu-metrics=true \
    --allow-cpu-metrics=true \
    --metrics-port=8002 \
    "--grpc-restricted-protocol=${RESTRICTED}:genrec-admin-key=${KEY}" \
    "--http-restricted-api=${RESTRICTED}:genrec-admin-key=${KEY}" \
    "$@"
