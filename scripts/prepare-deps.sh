#!/usr/bin/env bash
# Copies the build's dependencies from this machine's installed packages into .deps/ (ignored
# by git), for a machine with no package registry (the GPU machine of scripts/gpu-validate.sh,
# which receives .deps/ as a carried folder). cmake/deps.cmake falls back to .deps/ for every
# package that is not installed there; -DMST_USE_DEPS_DIR=ON takes all of them from .deps/.
#   include/  CLI (CLI11), nlohmann (nlohmann_json), fmt, eigen3/Eigen, doctest, yaml-cpp
#   cmake/doctest/  doctest's CMake module (doctest_discover_tests)
#   lib/libyaml-cpp.a  yaml-cpp is a compiled library; the static one links without an rpath
# fmt is used header-only from here (FMT_HEADER_ONLY).
# Usage: scripts/prepare-deps.sh [dest]   (default: <repo>/.deps); about 13 MiB.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$root/.deps}"
inc=/usr/include
multiarch="$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)"
libdir="/usr/lib/$multiarch"

need() { [ -e "$1" ] || { echo "prepare-deps: $1 is missing (install $2)" >&2; exit 1; }; }
need "$inc/CLI/CLI.hpp" libcli11-dev
need "$inc/nlohmann/json.hpp" nlohmann-json3-dev
need "$inc/fmt/format.h" libfmt-dev
need "$inc/eigen3/Eigen/Core" libeigen3-dev
need "$inc/doctest/doctest.h" doctest-dev
need "$inc/yaml-cpp/yaml.h" libyaml-cpp-dev
need "$libdir/libyaml-cpp.a" libyaml-cpp-dev
doctest_cmake=""
for d in /usr/lib/cmake/doctest "$libdir/cmake/doctest" /usr/share/doctest/cmake; do
    [ -f "$d/doctest.cmake" ] && { doctest_cmake="$d"; break; }
done
[ -n "$doctest_cmake" ] || { echo "prepare-deps: doctest's CMake module (doctest.cmake) not found" >&2; exit 1; }

rm -rf "$dest"
mkdir -p "$dest/include/eigen3" "$dest/cmake/doctest" "$dest/lib"
cp -r "$inc/CLI" "$inc/nlohmann" "$inc/fmt" "$inc/doctest" "$inc/yaml-cpp" "$dest/include/"
cp -r "$inc/eigen3/Eigen" "$inc/eigen3/signature_of_eigen3_matrix_library" "$dest/include/eigen3/"
cp "$doctest_cmake/doctest.cmake" "$doctest_cmake/doctestAddTests.cmake" "$dest/cmake/doctest/"
cp "$libdir/libyaml-cpp.a" "$dest/lib/"
{
    echo "copied $(date -u +%Y-%m-%dT%H:%M:%SZ) from $(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME")"
    for p in libcli11-dev nlohmann-json3-dev libfmt-dev libeigen3-dev doctest-dev libyaml-cpp-dev; do
        dpkg-query -W -f='${Package} ${Version}\n' "$p" 2>/dev/null || echo "$p ?"
    done
    echo "g++ here: $(g++ --version | head -n 1)"
} > "$dest/VERSIONS"
echo "prepare-deps: $(du -sh "$dest" | cut -f1) in $dest" >&2
