#!/usr/bin/env bash
# The pinned Python stack (torch, transformers, pytest: python/requirements/torch.txt) in a
# virtual environment, created on first use and reused while the pins are unchanged.
# Sourced by scripts/test; `bash scripts/python-env.sh` prints the interpreter's path.
#   MST_VENV   where the environment lives (default <repo>/.venv/torch; ignored by git)
set -euo pipefail

mst_python_env() {
    local root venv pins stamp
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    venv="${MST_VENV:-$root/.venv/torch}"
    pins="$root/python/requirements/torch.txt"
    stamp="$venv/.mst-pins"
    if [ -x "$venv/bin/python" ] && cmp -s "$pins" "$stamp"; then
        echo "$venv/bin/python"
        return 0
    fi
    echo "mst-plan: installing the Python stack into $venv (torch, transformers; a few minutes, once)..." >&2
    if ! python3 -m venv --clear "$venv" >&2 2>/dev/null; then
        local sudo=""
        [ "$(id -u)" -ne 0 ] && sudo="sudo"
        $sudo apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv >&2
        python3 -m venv --clear "$venv" >&2
    fi
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$pins" >&2
    cp "$pins" "$stamp"
    echo "$venv/bin/python"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    mst_python_env
fi
