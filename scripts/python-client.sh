#!/usr/bin/env bash
# Sets up the Python reference client (clients/python): a venv with the packages of
# clients/python/requirements.txt (pinned, hash-checked wheels), and the gRPC stubs generated from proto/proto
# with grpcio-tools. Both live under ~/.cache/vesper/python (VESPER_PYTHON_DIR overrides), beside the build
# cache of scripts/env.sh, keyed by hashes of what they are made from, so later runs, also from a fresh clone,
# reuse them; nothing generated goes into the repository.
#   scripts/python-client.sh                 prints the path of a `python` that has the packages and the stubs
#   scripts/python-client.sh SCRIPT [ARG...]   runs SCRIPT with it (clients/python/check.py, for example)
# Needs CPython 3.11 (the wheels pinned are built for it): `python3.11`, else `python3`, or VESPER_PYTHON.
# Progress goes to stderr. Old venv-* and stubs-* folders of the cache may be deleted at any time.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
requirements="$root/clients/python/requirements.txt"
cache="${VESPER_PYTHON_DIR:-$HOME/.cache/vesper/python}"

python="${VESPER_PYTHON:-}"
if [ -z "$python" ]; then
    python="$(command -v python3.11 || command -v python3 || true)"
fi
if [ -z "$python" ] || ! version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"; then
    echo "python-client.sh: no Python found (install CPython 3.11, or set VESPER_PYTHON)" >&2
    exit 1
fi
if [ "$version" != "3.11" ]; then
    echo "python-client.sh: $python is Python $version; the pinned wheels need CPython 3.11 (set VESPER_PYTHON)" >&2
    exit 1
fi

digest() { sha256sum | cut -c1-16; }
venv_key="$( { cat "$requirements"; "$python" -c 'import sys; print(sys.version, sys.executable)'; uname -m; } | digest)"
venv="$cache/venv-$venv_key"
# The stubs depend on the venv (grpcio-tools' version), the .proto files and how this script generates them.
stubs_key="$( { echo "$venv_key"; cat "$root"/proto/proto/vesper/v1/*.proto "${BASH_SOURCE[0]}"; } | digest)"
stubs="$cache/stubs-$stubs_key"

mkdir -p "$cache"
# One set-up at a time (two test runs, or a test beside scripts/test.sh); a folder counts once its marker exists.
exec 9>"$cache/.lock"
flock 9

if [ ! -e "$venv/.complete" ]; then
    started=$SECONDS
    echo "==> python client: creating $venv" >&2
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
        --require-hashes --only-binary=:all: -r "$requirements" >&2
    touch "$venv/.complete"
    echo "==> python client: venv ready in $((SECONDS - started)) s" >&2
fi

if [ ! -e "$stubs/.complete" ]; then
    echo "==> python client: generating stubs in $stubs" >&2
    rm -rf "$stubs"
    mkdir -p "$stubs"
    "$venv/bin/python" -m grpc_tools.protoc -I "$root/proto/proto" \
        --python_out="$stubs" --grpc_python_out="$stubs" "$root"/proto/proto/vesper/v1/*.proto
    # The interpreter to use: the venv's, with the stubs importable as `vesper.v1`.
    {
        echo '#!/bin/sh'
        echo '# The Vesper Python client'"'"'s interpreter: the venv of scripts/python-client.sh, with the generated stubs.'
        # Bytecode of clients/python goes to the cache too, not into the work tree.
        printf 'PYTHONPATH=%q${PYTHONPATH:+:$PYTHONPATH} PYTHONPYCACHEPREFIX=%q exec %q "$@"\n' \
            "$stubs" "$stubs/pycache" "$venv/bin/python"
    } >"$stubs/python"
    chmod +x "$stubs/python"
    "$stubs/python" -c 'from vesper.v1 import leaf_pb2, leaf_pb2_grpc' >&2
    touch "$stubs/.complete"
fi

exec 9>&-
if [ "$#" -eq 0 ]; then
    echo "$stubs/python"
else
    exec "$stubs/python" "$@"
fi
