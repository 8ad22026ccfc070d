#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit tests, the process-level integration tests and a short
# run of every fuzz target.
# Installs missing system packages and builds first. `.ci/run` runs exactly this.
source "$(dirname "$0")/env.sh"
cd "$VESPER_ROOT"
# The NAT lab tests build routers from network namespaces and iptables, check interop with coturn's STUN
# client, and capture a relay's traffic with tcpdump.
vesper_install_packages iproute2 iptables coturn tcpdump
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "==> building binaries for the integration tests"
cargo build --workspace --bins
echo "==> tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast
else
    # Without nextest: one test at a time, so cluster tests do not compete for the two cores.
    cargo test --workspace --no-fail-fast -- --test-threads=1
fi
echo "==> fuzz targets, 10 s each (longer runs: docs/FUZZING.md)"
"$VESPER_ROOT/scripts/fuzz.sh" 10
