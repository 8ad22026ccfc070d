#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for SECONDS each (default 10), with cargo-fuzz and libFuzzer under
# AddressSanitizer. The test command runs the short default; longer runs: docs/FUZZING.md.
#   scripts/fuzz.sh [SECONDS] [TARGET...]
source "$(dirname "$0")/env.sh"
cd "$VESPER_ROOT"
seconds="${1:-10}"
shift || true
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
# cargo-fuzz passes nightly flags (-Zsanitizer); this lets the stable toolchain, the only one a fresh machine
# has, accept them.
export RUSTC_BOOTSTRAP=1
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# Build first, so a target that no longer compiles is reported as that, not as a crash.
echo "==> building the fuzz targets"
if ! cargo fuzz build --fuzz-dir fuzz >"$work/build.log" 2>&1; then
    grep -E "^(error|warning)" -A12 "$work/build.log" | head -n 80 >&2
    echo "the fuzz targets do not build (fuzz/ is outside the workspace: cargo build does not check it)" >&2
    exit 1
fi
for target in "${targets[@]}"; do
    echo "==> fuzzing $target for ${seconds}s"
    mkdir -p "$work/$target"
    seeds=()
    [ -d "fuzz/seeds/$target" ] && seeds=("fuzz/seeds/$target")
    # New inputs go to a scratch corpus; crashes are written to fuzz/artifacts/<target>/ and fail the run.
    set +e
    cargo fuzz run --fuzz-dir fuzz "$target" "$work/$target" "${seeds[@]}" -- \
        -max_total_time="$seconds" >"$work/$target.log" 2>&1
    status=$?
    set -e
    if [ "$status" -ne 0 ]; then
        tail -n 60 "$work/$target.log" >&2
        echo "fuzz target $target failed (exit $status); the input is in fuzz/artifacts/$target/" >&2
        exit 1
    fi
    grep -E "^Done [0-9]+ runs" "$work/$target.log" || tail -n 3 "$work/$target.log"
done
