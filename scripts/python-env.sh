#!/usr/bin/env bash
# The pinned Python stack (torch, transformers, pytest: python/requirements/torch.txt) in a
# virtual environment, created on first use and reused while the pins are unchanged.
# Sourced by scripts/test and scripts/check-clients; `bash scripts/python-env.sh` prints the
# interpreter's path.
#   MST_VENV   where the environment lives (default <repo>/.venv/torch; ignored by git)
set -euo pipefail

# mst_pip <dir> <python> -m pip install ...: quiet, without pip's cache (the wheels of torch and
# its CUDA libraries are several GiB: a cached copy would double the disk they take while
# installing); on failure, says how much disk was left where <dir> lives.
mst_pip() {
    local dir="$1"
    shift
    if ! "$@" -q --disable-pip-version-check --no-cache-dir >&2; then
        echo "error: pip install into $dir failed ($(df -h --output=avail "$dir" 2>/dev/null | tail -1 | tr -d ' ') free there)" >&2
        return 1
    fi
}

# mst_stamped <pins> <stamp>: installed from exactly these pins before.
mst_stamped() {
    [ -f "$2" ] && cmp -s "$1" "$2"
}

# mst_ready_venv <venv> <pins>: prints the environment's interpreter when it was installed from
# exactly these pins (its stamp, <venv>/.mst-pins); fails otherwise.
mst_ready_venv() {
    [ -x "$1/bin/python" ] && mst_stamped "$2" "$1/.mst-pins" && echo "$1/bin/python"
}

mst_python_env() {
    local root venv pins stamp
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    venv="${MST_VENV:-$root/.venv/torch}"
    pins="$root/python/requirements/torch.txt"
    stamp="$venv/.mst-pins"
    if mst_ready_venv "$venv" "$pins"; then return 0; fi
    echo "mst-plan: installing the Python stack into $venv (torch, transformers; a few minutes, once)..." >&2
    if ! python3 -m venv --clear "$venv" >&2 2>/dev/null; then
        local sudo=""
        [ "$(id -u)" -ne 0 ] && sudo="sudo"
        $sudo apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv >&2
        python3 -m venv --clear "$venv" >&2
    fi
    # (set -e does not hold inside the callers' $(...): a failed install must not be stamped)
    mst_pip "$venv" "$venv/bin/python" -m pip install -r "$pins" || return 1
    cp "$pins" "$stamp"
    echo "$venv/bin/python"
}

# mst_clients_env <python> <client>: a trainer's packages (python/requirements/clients-<client>.txt:
# deepspeed, torchtitan) in a directory put on PYTHONPATH over that interpreter's stack; prints the
# directory (.venv/clients-<client>; MST_CLIENTS_DIR overrides DeepSpeed's, MST_TITAN_DIR torchtitan's).
mst_clients_env() {
    local python="$1" client="$2" root dir pins stamp
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    local ds_dir="${MST_CLIENTS_DIR:-$root/.venv/clients-deepspeed}" titan_dir="${MST_TITAN_DIR:-$root/.venv/clients-torchtitan}"
    case "$client" in
        deepspeed) dir="$ds_dir" ;;
        torchtitan) dir="$titan_dir" ;;
        *) echo "error: mst_clients_env: client: expected deepspeed or torchtitan, got '$client'" >&2; return 2 ;;
    esac
    # Each client has a directory of its own: one install would wipe the other's.
    if [ "$(realpath -m "$ds_dir")" = "$(realpath -m "$titan_dir")" ]; then
        echo "error: MST_TITAN_DIR: $titan_dir: expected a directory other than MST_CLIENTS_DIR's" >&2
        return 1
    fi
    pins="$root/python/requirements/clients-$client.txt"
    stamp="$dir/.mst-pins"
    if mst_stamped "$pins" "$stamp"; then
        echo "$dir"
        return 0
    fi
    echo "mst-plan: installing $client for the client checks into $dir (once)..." >&2
    # Only a directory this function made (its marker file) is replaced: a virtual environment
    # holds a stamp too, never the marker.
    if [ -e "$dir" ] && [ ! -f "$dir/.mst-clients" ]; then
        echo "error: $dir: expected a new directory or one made by mst_clients_env" >&2
        return 1
    fi
    rm -rf "$dir"
    mkdir -p "$dir" && touch "$dir/.mst-clients" || return 1
    # DS_BUILD_OPS=0: DeepSpeed compiles no CUDA op at install time.
    DS_BUILD_OPS=0 mst_pip "$dir" "$python" -m pip install --no-deps --no-build-isolation \
        --target "$dir" -r "$pins" || return 1
    cp "$pins" "$stamp"
    echo "$dir"
}

# mst_python312: a Python 3.12 interpreter (MST_PYTHON312, python3.12 on PATH, or pyenv's), or
# nothing. A pyenv shim whose version is not selected fails when run, so each is asked to run. A
# given MST_PYTHON312 that is not one is an error (status 2), not a reason to look elsewhere.
mst_python312() {
    local candidate
    local is312='import sys; assert sys.version_info[:2] == (3, 12)'
    if [ -n "${MST_PYTHON312:-}" ]; then
        if ! "$MST_PYTHON312" -c "$is312" 2>/dev/null; then
            echo "error: MST_PYTHON312: $MST_PYTHON312: expected a Python 3.12 interpreter" >&2
            return 2
        fi
        echo "$MST_PYTHON312"
        return 0
    fi
    for candidate in "$(command -v python3.12 || true)" \
        "$(command -v pyenv >/dev/null && ls -d "$(pyenv root)"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)"; do
        if [ -n "$candidate" ] && "$candidate" -c "$is312" 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

# mst_axolotl_env: Axolotl 0.21.0 (python/requirements/clients-axolotl.txt) in a Python 3.12
# virtual environment of its own, created on first use and reused while the pins are unchanged;
# prints its interpreter. Without Python 3.12 it says so and prints nothing (the check is skipped).
#   MST_AXOLOTL_VENV   where it lives (default <repo>/.venv/clients-axolotl)
mst_axolotl_env() {
    local root venv pins stamp python312
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    venv="${MST_AXOLOTL_VENV:-$root/.venv/clients-axolotl}"
    pins="$root/python/requirements/clients-axolotl.txt"
    stamp="$venv/.mst-pins"
    if mst_ready_venv "$venv" "$pins"; then return 0; fi
    local found=0
    python312="$(mst_python312)" || found=$?
    if [ "$found" = 2 ]; then return 1; fi  # a wrong MST_PYTHON312, said
    if [ "$found" != 0 ]; then
        echo "mst-plan: no Python 3.12 here (python3.12, pyenv or MST_PYTHON312): Axolotl 0.21's loader check is skipped" >&2
        return 0
    fi
    # Only a folder this function made (its marker file) is cleared and replaced.
    if [ -e "$venv" ] && [ ! -f "$venv/.mst-axolotl" ]; then
        echo "error: MST_AXOLOTL_VENV: $venv: expected a new directory or one made by mst_axolotl_env" >&2
        return 1
    fi
    echo "mst-plan: installing Axolotl 0.21.0 for the client checks into $venv (a few minutes, once)..." >&2
    "$python312" -m venv --clear "$venv" >&2 && touch "$venv/.mst-axolotl" || return 1
    mst_pip "$venv" "$venv/bin/python" -m pip install --no-deps -r "$pins" || return 1
    cp "$pins" "$stamp"
    echo "$venv/bin/python"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    mst_python_env
fi
