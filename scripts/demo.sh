#!/usr/bin/env bash
# The conference story end to end with real processes: a local 3-super-peer cluster, alice, bob and carol,
# a super peer killed mid-chat, and a summary of who received what. Add --json for a machine-readable summary.
source "$(dirname "$0")/env.sh"
cd "$VESPER_ROOT"
cargo build --workspace --bins
exec "$VESPER_BIN/vesper-demo" "$@"
