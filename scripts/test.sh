#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit tests, the process-level integration tests and a short
# run of every fuzz target.
# Installs missing system packages and builds first. `.ci/run` runs exactly this.
source "$(dirname "$0")/env.sh"
cd "$VESPER_ROOT"
# The NAT lab tests build routers from network namespaces and iptables, check interop with coturn's STUN
# client, and capture a relay's traffic with tcpdump. The ops port tests scrape a cluster with a real Prometheus
# and check the exposition with its promtool, and load the status page in headless Chromium (Debian's
# prometheus and chromium: about 18 s each to install on a cold machine).
vesper_install_packages iproute2 iptables coturn tcpdump prometheus chromium
echo "==> dependency boundary: the leaf library's tree holds no RocksDB or openraft"
# What an app embeds must not pull in the super peer's storage or consensus. The same query on the super peer
# must find them, or the check itself is broken.
server_side='^(rocksdb|librocksdb-sys|openraft) '
leaf_tree() { cargo tree -p vesper-leafpeer "$@" -e normal,build --prefix none --quiet; }
for features in "" "--no-default-features"; do
    if leaf_tree $features | grep -E "$server_side"; then
        echo "the leaf library (${features:-default features}) depends on the crates above" >&2
        exit 1
    fi
done
if ! cargo tree -p vesper-superpeer -e normal --prefix none --quiet | grep -qE "$server_side"; then
    echo "the dependency boundary check found no RocksDB/openraft in the super peer: the check is broken" >&2
    exit 1
fi
echo "==> cargo deny: licences, duplicate versions, sources (offline; deny.toml)"
# Pinned; built from the crates registry on first use (about 3 minutes of both cores on a cold machine).
CARGO_DENY_VERSION=0.20.2
if [ "$(cargo deny --version 2>/dev/null)" != "cargo-deny $CARGO_DENY_VERSION" ]; then
    cargo install cargo-deny --locked --version "$CARGO_DENY_VERSION"
fi
cargo deny --offline check licenses bans sources
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "==> building binaries for the integration tests"
cargo build --workspace --bins
echo "==> Python reference client: venv and stubs (clients/python; about 12 s the first time, then cached)"
# The integration test t67 runs the client against a cluster; a failed set-up stops here, not in that test.
"$VESPER_ROOT/scripts/python-client.sh" >/dev/null
echo "==> chart tools: helm and the manifest validators (scripts/chart-tools.sh; about 50 s the first time)"
# t110 and t111 render the Helm chart with a pinned helm and check it with kubernetes-validate and checkov.
"$VESPER_ROOT/scripts/chart-tools.sh" helm >/dev/null
"$VESPER_ROOT/scripts/chart-tools.sh" validators >/dev/null
echo "==> tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast
else
    # Without nextest: one test at a time, so cluster tests do not compete for the two cores.
    cargo test --workspace --no-fail-fast -- --test-threads=1
fi
echo "==> fuzz targets, 10 s each (longer runs: docs/FUZZING.md)"
"$VESPER_ROOT/scripts/fuzz.sh" 10
