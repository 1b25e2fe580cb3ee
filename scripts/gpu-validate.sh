#!/usr/bin/env bash
# One run on a GPU machine (H100/H200, no package registry): configure and build the CUDA
# backend from the carried .deps/ folder, run the CUDA tests (kernels vs their CPU twins,
# allocator, CUPTI, the CUDA executor) and the rest of the suite, time `mst-plan bench kernels`,
# and run the measure + compare matrix (`measure --backend cuda`). Results go to $OUT.
#
#   Here, first:   scripts/prepare-deps.sh          (fills .deps/: headers, doctest's CMake
#                                                    module, libyaml-cpp.a; about 11 MiB)
#   On the GPU:    the device tool's run, carry [".deps"], command
#                    bash scripts/gpu-validate.sh
#   Rehearsal:     OUT=/tmp/gv bash scripts/gpu-validate.sh --dry-run
#                  (every step that needs no GPU: configure and build from .deps/ alone, the
#                  CUDA tests must report "skipped" (exit 77), `bench kernels` and
#                  `measure --backend cuda` must refuse with one line and exit code 2)
#
# Options: --dry-run, --build-dir DIR (default build-gpu, or build-gpu-dryrun), --jobs N,
#          --bench-args "..." (extra arguments for bench kernels, e.g. "--seq 16384 --reps 3"),
#          --budget-s N (default 480: no measure case starts after N seconds from the start; the
#          cases left are listed as skipped in measure.jsonl).
# Budget: about 8 minutes on an H100 (build ~2, tests ~2, bench ~1, measure ~2); each GPU step
# has a timeout.
#
# $OUT receives 7 files, none in subfolders (the device tool returns 8 at most):
#   summary.txt        environment, every step's status and time, the bench table
#   build.log          configure + build output
#   cuda_tests.log     the CUDA test runner's output, per suite
#   ctest.log          the rest of the ctest suite (python excluded: it is not this backend's)
#   bench_kernels.json `mst-plan bench kernels` result (mst-plan's JSON)
#   measure.jsonl      the measure + compare matrix, one JSON document per line
#   measured.tar.gz    each case's measured.json, compare.json and output, and the cut model config
#
# Dependencies: cmake/deps.cmake takes CLI11, nlohmann_json, fmt, Eigen, doctest and toml++
# header-only from .deps/ (-DMST_USE_DEPS_DIR=ON, so the rehearsal here uses exactly what the GPU
# machine gets), and yaml-cpp from .deps/lib/libyaml-cpp.a; if that static library does not link
# with the GPU machine's compiler, the script rebuilds with -DMST_WITH_YAML=OFF (only the
# axolotl emitter and its tests drop out).
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
dry_run=0
build_dir=""
jobs="$(nproc 2>/dev/null || echo 4)"
bench_args=""
budget_s=480
while [ $# -gt 0 ]; do
    case "$1" in
    --dry-run) dry_run=1 ;;
    --build-dir) build_dir="$2"; shift ;;
    --jobs) jobs="$2"; shift ;;
    --bench-args) bench_args="$2"; shift ;;
    --budget-s) budget_s="$2"; shift ;;
    -h | --help) sed -n '2,36p' "$0"; exit 0 ;;
    *) echo "gpu-validate: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
OUT="${OUT:-$root/out/gpu-validate}"
mkdir -p "$OUT"
[ -n "$build_dir" ] || build_dir="$root/build-gpu$([ $dry_run = 1 ] && echo -dryrun)"
summary="$OUT/summary.txt"
: >"$summary"
failures=0
t_start=$(date +%s)

say() { echo "$*" | tee -a "$summary"; }
# step NAME STATUS SECONDS [DETAIL]
step() {
    local line
    line=$(printf '%-22s %-8s %5ss  %s' "$1" "$2" "$3" "${4:-}")
    say "$line"
    [ "$2" = FAIL ] && failures=$((failures + 1))
    return 0
}
elapsed() { echo $(($(date +%s) - $1)); }

say "mst-plan gpu-validate $(date -u +%Y-%m-%dT%H:%M:%SZ)$([ $dry_run = 1 ] && echo ' (dry run: no GPU steps)')"
say "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (+ local changes)')"

# ---- environment --------------------------------------------------------------------------
command -v nvcc >/dev/null 2>&1 || export PATH="/usr/local/cuda/bin:$PATH"
{
    echo "--- environment"
    uname -srm
    (. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME")
    g++ --version 2>&1 | head -n 1
    cmake --version 2>&1 | head -n 1
    ninja --version 2>&1 | sed 's/^/ninja /'
    nvcc --version 2>&1 | tail -n 2 | head -n 1
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1
    else
        echo "nvidia-smi: not found"
    fi
    [ -f .deps/VERSIONS ] && sed 's/^/deps: /' .deps/VERSIONS
    echo "---"
} >>"$summary" 2>&1

# ---- dependencies ---------------------------------------------------------------------------
t=$(date +%s)
if [ ! -f .deps/include/CLI/CLI.hpp ]; then
    if [ -f /usr/include/CLI/CLI.hpp ] && bash scripts/prepare-deps.sh >>"$summary" 2>&1; then
        step deps ok "$(elapsed $t)" "made .deps/ from this machine's packages"
    else
        step deps FAIL "$(elapsed $t)" ".deps/ is missing: run scripts/prepare-deps.sh where the packages are and carry .deps"
        exit 1
    fi
else
    step deps ok "$(elapsed $t)" ".deps/ present ($(du -sh .deps | cut -f1))"
fi

# ---- configure and build --------------------------------------------------------------------
configure() {  # configure <dir> [extra cmake args]
    local dir="$1"; shift
    cmake -S "$root" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMST_WITH_CUDA=ON -DMST_USE_DEPS_DIR=ON \
        -DMST_DEPS_DIR="$root/.deps" -DCMAKE_CUDA_ARCHITECTURES=90 -DMST_WARNINGS_AS_ERRORS=OFF "$@"
}
t=$(date +%s)
yaml_note="yaml-cpp from .deps/lib"
if ! { configure "$build_dir" && ninja -C "$build_dir" -j "$jobs"; } >"$OUT/build.log" 2>&1; then
    say "build with the carried yaml-cpp failed (tail of build.log below); retrying without yaml-cpp"
    tail -n 15 "$OUT/build.log" >>"$summary"
    yaml_note="without yaml-cpp (axolotl emitter off)"
    rm -rf "$build_dir"
    if ! { configure "$build_dir" -DMST_WITH_YAML=OFF && ninja -C "$build_dir" -j "$jobs"; } >>"$OUT/build.log" 2>&1; then
        step build FAIL "$(elapsed $t)" "see build.log"
        tail -n 30 "$OUT/build.log" >>"$summary"
        exit 1
    fi
fi
step build ok "$(elapsed $t)" "$yaml_note, sm_90, $build_dir"
MST="$build_dir/src/mst-plan"
TESTS="$build_dir/tests/cuda/mst_cuda_tests"

# ---- the device ----------------------------------------------------------------------------
devices_json="$("$MST" --json devices 2>&1)"
device_name="$(printf '%s' "$devices_json" | python3 -c 'import json,sys
d = json.load(sys.stdin).get("devices", [])
print(d[0]["name"] if d else "")' 2>/dev/null)"
if [ -n "$device_name" ]; then
    say "device: $device_name"
else
    say "device: none ($(printf '%s' "$devices_json" | tr '\n' ' ' | cut -c1-200))"
fi
if [ $dry_run = 0 ] && [ -z "$device_name" ]; then
    step device FAIL 0 "no usable CUDA device on the GPU machine"
fi
case "$device_name" in
*H200*) gpu_profile=h200-141gb ;;
*H100*PCIe* | *H100*PCIE*) gpu_profile=h100-pcie-80gb ;;
*H100*) gpu_profile=h100-sxm-80gb ;;
*A100*40GB*) gpu_profile=a100-40gb ;;
*A100*) gpu_profile=a100-80gb ;;
*) gpu_profile=h100-sxm-80gb ;;
esac

# ---- CUDA tests -------------------------------------------------------------------------------
: >"$OUT/cuda_tests.log"
t=$(date +%s)
echo "=== host suite (no device needed)" >>"$OUT/cuda_tests.log"
if "$TESTS" --test-suite=host >>"$OUT/cuda_tests.log" 2>&1; then
    step cuda.host ok "$(elapsed $t)"
else
    step cuda.host FAIL "$(elapsed $t)" "see cuda_tests.log"
fi
for suite in kernels allocator cupti executor; do
    t=$(date +%s)
    echo "=== $suite suite" >>"$OUT/cuda_tests.log"
    timeout 300 "$TESTS" --requires-device --test-suite="$suite" >>"$OUT/cuda_tests.log" 2>&1
    rc=$?
    if [ $dry_run = 1 ]; then
        if [ $rc = 77 ]; then step "cuda.$suite" ok "$(elapsed $t)" "skipped without a device (exit 77), as expected"
        else step "cuda.$suite" FAIL "$(elapsed $t)" "expected exit 77 without a device, got $rc"; fi
    else
        case $rc in
        0) step "cuda.$suite" ok "$(elapsed $t)" "$(grep -E '^\[doctest\] test cases' "$OUT/cuda_tests.log" | tail -n 1 | tr -s ' ')" ;;
        77) step "cuda.$suite" FAIL "$(elapsed $t)" "skipped: the runner found no device" ;;
        124) step "cuda.$suite" FAIL "$(elapsed $t)" "timed out after 300 s" ;;
        *) step "cuda.$suite" FAIL "$(elapsed $t)" "exit $rc, see cuda_tests.log" ;;
        esac
    fi
done

# ---- the whole suite ----------------------------------------------------------------------------
t=$(date +%s)
# (the device suites ran above, once each)
if timeout 420 ctest --test-dir "$build_dir" -E '^(python|cuda\.(kernels|allocator|cupti|executor))$' -j "$jobs" \
    --output-on-failure >"$OUT/ctest.log" 2>&1; then
    step ctest ok "$(elapsed $t)" "$(grep -E 'tests passed' "$OUT/ctest.log" | tail -n 1)"
else
    step ctest FAIL "$(elapsed $t)" "$(grep -E 'tests passed|tests failed' "$OUT/ctest.log" | tail -n 1), see ctest.log"
fi

# ---- bench kernels ---------------------------------------------------------------------------------
t=$(date +%s)
# shellcheck disable=SC2086
timeout 300 "$MST" bench kernels --gpu "$gpu_profile" --out "$OUT/bench_kernels.json" $bench_args >"$OUT/bench.txt" 2>&1
rc=$?
if [ $dry_run = 1 ]; then
    if [ $rc = 2 ] && grep -q '^error: bench kernels: ' "$OUT/bench.txt"; then
        step bench.kernels ok "$(elapsed $t)" "refused without a device: $(head -n 1 "$OUT/bench.txt" | cut -c1-100)"
    else
        step bench.kernels FAIL "$(elapsed $t)" "expected one error line and exit 2, got exit $rc"
    fi
else
    if [ $rc = 0 ]; then step bench.kernels ok "$(elapsed $t)" "profile $gpu_profile; $(tail -n 1 "$OUT/bench.txt")"
    else step bench.kernels FAIL "$(elapsed $t)" "exit $rc: $(tail -n 1 "$OUT/bench.txt")"; fi
fi
{ echo "--- bench kernels"; cat "$OUT/bench.txt"; echo "---"; } >>"$summary"
rm -f "$OUT/bench.txt"

# ---- measure + compare matrix (the executor's CUDA backend) --------------------------------------
# One real step per case through `measure --backend cuda` (CUPTI-recorded, exact allocator unless
# the case says caching), re-simulated by `compare --run`: tiny, small, Llama-3-8B cut to 4 layers
# (its real shapes: d 4096, I 14336, V 128256) at 8k and 32k over several M and checkpoint
# settings, and the full 32-layer Llama-3-8B when the simulator says it fits the device. Every case
# sets the 32 MiB cuBLAS workspace Hopper gets from PyTorch, so prediction and measurement hold
# the same fixed buffer. One JSON line per case goes to measure.jsonl (the comparison and the
# device report); the measurements themselves, with the cut model's config, go to
# measured.tar.gz, so `mst-plan compare --run` can be re-run on them (the cut model's cases name
# its config by the path it had here: point model_path at the copy in the archive).
t=$(date +%s)
if [ $dry_run = 1 ] || [ -z "$device_name" ]; then
    probe=$("$MST" measure --backend cuda --model tiny-llama --seq 8 2>&1 >/dev/null)
    rc=$?
    if [ $rc = 2 ] && echo "$probe" | grep -q "no usable CUDA device"; then
        step measure.matrix ok "$(elapsed $t)" "refused without a device: $(echo "$probe" | head -n 1 | cut -c1-100)"
    else
        step measure.matrix FAIL "$(elapsed $t)" "expected 'no usable CUDA device' and exit 2, got exit $rc"
    fi
else
    mdir="$build_dir/measured"
    rm -rf "$mdir" && mkdir -p "$mdir"
    python3 - "$root/models/llama-3-8b.json" "$mdir/llama-3-8b-4layers.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c["num_hidden_layers"] = 4
c.pop("_mst", None)  # its published parameter counts are the 32-layer model's
json.dump(c, open(sys.argv[2], "w"), indent=2)
PY
    cut="$mdir/llama-3-8b-4layers.json"
    # Cheapest first: the time budget cuts the expensive tail, never the basics.
    cases=(
        "tiny-default|--model tiny-llama --seq 1024"
        "tiny-ckpt-mst4|--model tiny-llama --seq 4096 --checkpoint all --mlp-chunks 4 --lm-chunks 4"
        "tiny-eager-amp-fused|--model tiny-llama --seq 1024 --attention eager --precision amp --lm-chunks 2 --lm-impl fused"
        "small-ckpt-mst|--model small-llama --seq 8192 --checkpoint all --mlp-chunks 4 --lm-chunks 16"
        "small-offload-tiled-fused|--model small-llama --seq 8192 --checkpoint all --offload --mlp-chunks 8 --mlp-impl tiled --lm-chunks 8 --lm-impl fused"
        "l3-8b-4l-8k-master-fused|--model $cut --seq 8192 --precision bf16-master --checkpoint all --mlp-chunks 4 --mlp-impl tiled --lm-chunks 8 --lm-impl fused"
        "l3-8b-4l-8k-caching|--model $cut --seq 8192 --checkpoint all --mlp-chunks 4 --lm-chunks 4 --allocator caching"
    )
    # The edge: full-depth Llama-3-8B at the longest sequence `max-seq` predicts for each strategy
    # on this GPU, measured with the caching allocator (max-seq budgets reserved memory). Edges up
    # to 16k tokens are cheap and run early; the longer ones run last, if time is left.
    "$MST" --json max-seq --model llama-3-8b --gpu "$gpu_profile" --runtime kernels >"$mdir/max_seq.json" 2>>"$summary"
    early_edges=()
    late_edges=()
    while IFS='|' read -r name seq file; do
        [ -n "$name" ] || continue
        if [ "$seq" -le 16384 ]; then early_edges+=("$name|--model llama-3-8b --setup $file --allocator caching")
        else late_edges+=("$name|--model llama-3-8b --setup $file --allocator caching"); fi
    done < <(python3 - "$mdir/max_seq.json" "$mdir" <<'PY'
import json, re, sys
rows = json.load(open(sys.argv[1]))["rows"]
for r in rows:
    if r["max_seq"] <= 0 or r["setup"].get("offload_checkpoints"):
        continue  # the offload edge needs 90k+ tokens of attention: beyond one call's budget
    name = "l3-8b-32l-edge-" + re.sub("[^a-z]+", "-", r["strategy"].lower()).strip("-") + "-" + str(r["max_seq"])
    path = f"{sys.argv[2]}/{name}.setup.json"
    json.dump(r["setup"], open(path, "w"))
    print(f"{name}|{r['max_seq']}|{path}")
PY
)
    [ $((${#early_edges[@]} + ${#late_edges[@]})) -gt 0 ] || say "measure: no max-seq edge cases (see max_seq.json)"
    # Llama-3-8B shapes, 4 layers: S in {8k, 32k, 64k} x M_mlp = M_lm in {1, 4, 16} x checkpointing
    # off/on; after the 8k block, the full 32 layers at 8k and the cheap edges.
    for seq in 8192 32768 65536; do
        for m in 1 4 16; do
            for ck in none all; do
                cases+=("l3-8b-4l-$((seq / 1024))k-m$m-ckpt-$ck|--model $cut --seq $seq --mlp-chunks $m --lm-chunks $m --checkpoint $ck")
            done
        done
        if [ $seq = 8192 ]; then
            cases+=("l3-8b-32l-8k-ckpt-m4|--model llama-3-8b --seq 8192 --checkpoint all --mlp-chunks 4 --lm-chunks 4")
            [ ${#early_edges[@]} -gt 0 ] && cases+=("${early_edges[@]}")
        fi
    done
    [ ${#late_edges[@]} -gt 0 ] && cases+=("${late_edges[@]}")
    : >"$OUT/measure.jsonl"
    ok=0     # cases that ran to the end
    oom=0    # ... or stopped out of memory (exit 4) where the simulator said it would not fit
    oom_mispredicted=0  # ... or out of memory where the simulator said it fits: a misprediction
    agree=0  # ... whose timeline equals the prediction and whose device events equal the executor's log
    skipped=0
    for entry in "${cases[@]}"; do
        name="${entry%%|*}"
        args="${entry#*|}"
        left=$((budget_s - $(elapsed "$t_start")))
        if [ $left -lt 20 ]; then
            skipped=$((skipped + 1))
            python3 -c 'import json,sys; print(json.dumps({"case": sys.argv[1], "args": sys.argv[2], "skipped": "time budget"}))' \
                "$name" "$args" >>"$OUT/measure.jsonl"
            continue
        fi
        mkdir -p "$mdir/$name"
        # the simulator's verdict on this GPU (its profile holds the same 32 MiB cuBLAS workspace)
        # shellcheck disable=SC2046
        "$MST" --json estimate $(echo "$args" | sed 's/--allocator [a-z]*//') --gpu "$gpu_profile" --runtime kernels \
            >"$mdir/$name/estimate.json" 2>/dev/null
        # shellcheck disable=SC2086
        timeout -k 10 "$left" "$MST" measure --backend cuda $args --workspace-bytes 33554432 --out "$mdir/$name" \
            >"$mdir/$name/measure.txt" 2>&1
        rc=$?
        if [ $rc = 0 ]; then
            timeout 60 "$MST" --json compare --run "$mdir/$name/measured.json" --svg "$mdir/$name/overlay.svg" \
                >"$mdir/$name/compare.json" 2>>"$mdir/$name/measure.txt" || rc=5
        fi
        if [ $rc = 124 ] || [ $rc = 137 ]; then  # the time budget ran out during this case
            rm -rf "$mdir/$name"
            skipped=$((skipped + 1))
            python3 -c 'import json,sys; print(json.dumps({"case": sys.argv[1], "args": sys.argv[2], "skipped": "time budget (stopped while running)"}))' \
                "$name" "$args" >>"$OUT/measure.jsonl"
            say "measure $name: stopped by the time budget"
            continue
        fi
        find "$mdir/$name" -name '*.json' -size 0 -delete  # an output a failed command left empty
        python3 - "$name" "$args" "$mdir/$name" "$rc" >>"$OUT/measure.jsonl" <<'PY'
import json, sys
name, args, d, rc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def load(f):
    try: return json.load(open(d + "/" + f))
    except Exception: return None
est = load("estimate.json") or {}
out = {"case": name, "args": args, "exit": rc,
       "predicted": {"fits": est.get("fits"), "peak": (est.get("peak") or {}).get("bytes"),
                     "peak_reserved": (est.get("peak") or {}).get("reserved_bytes")}}
tail = open(d + "/measure.txt").read().strip().splitlines()[-3:]
m, c = load("measured.json"), load("compare.json")
if rc == 0 and m is not None and c is not None:
    dev = m.get("device") or {}
    out.update({"device": dev, "loss": m["summary"]["loss"], "wall_seconds": m["summary"]["wall_seconds"], "compare": c})
    print(json.dumps(out))
    sys.exit(0 if c.get("identical") and dev.get("matches_executor_log") else 3)
out["error"] = "\n".join(tail)[-600:] or "no measurement or comparison was written"
if rc == 4:  # out of memory: expected where the simulator said it does not fit, a misprediction where it said it fits
    out["measured"] = "out of memory"
    print(json.dumps(out))
    sys.exit(4 if est.get("fits") is False else 6)
print(json.dumps(out))
sys.exit(1)
PY
        verdict=$?
        case $verdict in
        0) ok=$((ok + 1)); agree=$((agree + 1)); say "measure $name: equal to the prediction; $(grep -E '^executor log vs measured' "$mdir/$name/measure.txt" | cut -c1-90)" ;;
        3) ok=$((ok + 1)); say "measure $name: DIFFERS from the prediction (see measure.jsonl)" ;;
        4) oom=$((oom + 1)); say "measure $name: out of memory, as the simulator predicted (fits: false)" ;;
        6) oom_mispredicted=$((oom_mispredicted + 1)); say "measure $name: OUT OF MEMORY where the simulator predicted it fits" ;;
        *) say "measure $name: FAILED (exit $rc): $(tail -n 1 "$mdir/$name/measure.txt" | cut -c1-160)" ;;
        esac
    done
    tar -czf "$OUT/measured.tar.gz" -C "$mdir" . 2>>"$summary"
    ran=$((ok + oom))
    if [ $agree = $ok ] && [ $ran = $((${#cases[@]} - skipped)) ]; then
        step measure.matrix ok "$(elapsed $t)" "$agree equal to the prediction, $oom out of memory as predicted, $skipped left for time"
    else
        step measure.matrix FAIL "$(elapsed $t)" "$ran of $((${#cases[@]} - skipped)) as predicted ($agree equal, $oom out of memory), $oom_mispredicted out of memory though predicted to fit, $skipped left for time"
    fi
fi

say "total $(elapsed "$t_start") s, $failures failed step(s); results in $OUT"
[ $failures = 0 ]
