# Shared set-up for the repository's scripts (sourced, not run).
#
# Installs the system packages the build needs when they are missing (Debian: clang's library and headers for
# RocksDB's bindings, sccache to cache compiled C++ and Rust), and points cargo at a target directory outside the
# clone so a fresh clone on the same machine reuses earlier builds (a cold RocksDB build takes about 13 minutes
# on 2 cores).
set -euo pipefail

VESPER_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export VESPER_ROOT

# Debian packages the build needs; checked one by one so a warm machine skips apt entirely.
VESPER_PACKAGES=(build-essential libclang1-14 libclang-common-14-dev sccache tmux)

vesper_install_packages() {
    local missing=()
    for package in "$@"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "==> installing system packages: ${missing[*]}"
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

vesper_install_packages "${VESPER_PACKAGES[@]}"

export CARGO_TARGET_DIR="${VESPER_TARGET_DIR:-$HOME/.cache/vesper/target}"
if command -v sccache >/dev/null 2>&1; then
    export RUSTC_WRAPPER="${RUSTC_WRAPPER:-sccache}"
    export SCCACHE_DIR="${SCCACHE_DIR:-$HOME/.cache/sccache}"
    export SCCACHE_CACHE_SIZE="${SCCACHE_CACHE_SIZE:-20G}"
fi
VESPER_BIN="$CARGO_TARGET_DIR/debug"
export VESPER_BIN
