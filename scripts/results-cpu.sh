#!/usr/bin/env bash
# Re-measures the CPU reference backend's committed results (results/cpu/) and regenerates the
# validation table (results/README.md) from every measurement under results/. Each case is one
# real training step (`mst-plan measure --backend cpu`); CI re-simulates them all
# (`mst-plan report results --check`, tests/CMakeLists.txt), so a simulator change that breaks
# agreement with a committed measurement fails there.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mst="$root/scripts/mst-plan"
cd "$root"
cases=(
    "tiny-default|--model tiny-llama --seq 256"
    "tiny-ckpt-mlp4-lm4-fused|--model tiny-llama --seq 256 --checkpoint all --mlp-chunks 4 --lm-chunks 4 --lm-impl fused"
    "tiny-eager-amp-tiled2-lm2|--model tiny-llama --seq 128 --attention eager --precision amp --mlp-chunks 2 --mlp-impl tiled --lm-chunks 2"
    "small-offload-master-mlp4-lm8-fused|--model small-llama --seq 64 --checkpoint all --offload --precision bf16-master --mlp-chunks 4 --lm-chunks 8 --lm-impl fused"
    "small-accum2-sgd-spread2|--model small-llama --seq 64 --grad-accum 2 --optimizer sgd --checkpoint spread:2 --mlp-chunks 3 --lm-chunks 3"
)
rm -rf results/cpu
for entry in "${cases[@]}"; do
    name="${entry%%|*}"
    # shellcheck disable=SC2086
    "$mst" measure --backend cpu ${entry#*|} --workspace-bytes 1048576 --out "results/cpu/$name" >/dev/null
done
"$mst" report results --out results/README.md
