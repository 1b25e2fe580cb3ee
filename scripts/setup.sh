#!/usr/bin/env bash
# Installs what is missing (Debian packages), configures and builds mst-plan.
# Sourced by scripts/mst-plan and scripts/test; safe to run again (a no-op when up to date).
#   MST_BUILD_DIR   build folder (default: <repo>/build)
#   CI=true         warnings are errors
set -euo pipefail

MST_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MST_BUILD_DIR="${MST_BUILD_DIR:-$MST_ROOT/build}"

mst_packages=(cmake ninja-build g++ libcli11-dev nlohmann-json3-dev libfmt-dev libeigen3-dev doctest-dev
              libyaml-cpp-dev)

# mst_install_missing [package...]: the Debian packages not yet installed (default: mst_packages).
mst_install_missing() {
    local missing=()
    [ $# -gt 0 ] || set -- "${mst_packages[@]}"
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "mst-plan: installing ${missing[*]}" >&2
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >&2
}

# mst_build <build-dir> [extra cmake args...]: configure once, then incremental builds.
# With MST_QUIET=1 the build's output goes to <build-dir>/build.log and shows only on failure.
mst_build() {
    local dir="$1"; shift
    local werror=OFF
    [ "${CI:-}" = "true" ] && werror=ON
    if [ "${MST_QUIET:-0}" = "1" ]; then
        [ -f "$dir/build.ninja" ] || echo "mst-plan: first build into $dir (about a minute)..." >&2
        mkdir -p "$dir"
        if ! { [ -f "$dir/build.ninja" ] || cmake -S "$MST_ROOT" -B "$dir" -G Ninja -DMST_WARNINGS_AS_ERRORS="$werror" "$@"; } \
                > "$dir/build.log" 2>&1 || ! cmake --build "$dir" --parallel "$(nproc)" >> "$dir/build.log" 2>&1; then
            cat "$dir/build.log" >&2
            return 1
        fi
        return 0
    fi
    if [ ! -f "$dir/build.ninja" ]; then
        cmake -S "$MST_ROOT" -B "$dir" -G Ninja -DMST_WARNINGS_AS_ERRORS="$werror" "$@" >&2
    elif [ $# -gt 0 ]; then
        cmake "$dir" "$@" > /dev/null  # options given again (a new MST_PYTHON) take effect
    fi
    cmake --build "$dir" --parallel "$(nproc)" >&2
}

mst_install_missing_python() {
    # pytest runs the trainer-side module's tests (python/tests); torch is optional there.
    if ! python3 -m pytest --version >/dev/null 2>&1; then
        echo "mst-plan: installing pytest" >&2
        python3 -m pip install -q pytest >&2
    fi
}

mst_install_missing
mst_install_missing_python
