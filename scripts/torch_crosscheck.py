#!/usr/bin/env python3
"""Measure a PyTorch + transformers training step under an mst-plan setup.

A thin command line over python/mst_referee (see python/README.md):

    scripts/torch_crosscheck.py llama-3-8b --plan plan.json --out run.json            # CUDA peaks
    scripts/torch_crosscheck.py llama-3-8b --setup knobs.json --seq 8192 --device fake --out run.json
    scripts/torch_crosscheck.py --matrix scripts/torch_matrix.json --out-dir results/h100-sxm-80gb/torch

``--device fake`` is the referee: the real step at full size on fake tensors, every storage
allocation and free recorded (an mst-measure/1 file with the full timeline).
"""

import os
import sys
from pathlib import Path

# transformers iterates a set of layer types (Gemma-3 computes one rotary table per type): string
# hashing orders it, and with it which tables a backward frees first. Hash seed 0 makes runs
# repeatable and is the order mst-plan models (python/README.md).
if os.environ.get("PYTHONHASHSEED") != "0":
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from mst_referee.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
