#!/usr/bin/env python3
"""Random tiny configs and setups through the referee and `mst-plan compare` (python/mst_referee/differential.py).

    scripts/referee_differential.py --families mixtral,qwen3_moe --cases 40 --seed 3 --out-dir /tmp/diff
"""

import os
import sys
from pathlib import Path

if os.environ.get("PYTHONHASHSEED") != "0":  # the order mst-plan models (see torch_crosscheck.py)
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from mst_referee.differential import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
