#!/usr/bin/env bash
# Starts a local 3-super-peer Vesper cluster with a throwaway dev CA, all data under .vesper/dev.
# Installs missing system packages and builds first. Ctrl-C stops the cluster; running it again resumes it.
# Extra arguments go to `vesperctl dev up` (see `--help`), e.g. --nodes 5.
source "$(dirname "$0")/env.sh"
cd "$VESPER_ROOT"
echo "==> building (the first build compiles RocksDB: about 13 minutes on 2 cores)"
cargo build --workspace --bins
exec "$VESPER_BIN/vesperctl" dev up --superpeer "$VESPER_BIN/superpeer" "$@"
