"""python -m mst_clients --mst-plan BIN --out-dir DIR: the plan matrix through the clients' code.

Prints one row per emitted ds_config.json (the deepspeed format's, and the axolotl format's
when its plan uses DeepSpeed): the Hugging Face Trainer, accelerate and DeepSpeed take it to a
built engine on a small model of the plan's family (ds_check), and the engine's batch, ZeRO,
parallel degrees and precision are the plan's. Exits 1 when any file is refused or a plan could
not be made, 2 on a usage error.
"""

import json
import sys
from pathlib import Path

from . import matrix


def main(argv=None) -> int:
    a = matrix.command_line("check-clients", __doc__.splitlines()[0], argv, ("deepspeed", "transformers"))
    if isinstance(a, int):
        return a
    from . import ds_check
    import logging

    import transformers as _transformers
    from deepspeed.utils import logger as _ds_logger
    from mst_referee import jobs
    _transformers.utils.logging.set_verbosity_error()  # the Trainer's notes on the stand-in process group
    _ds_logger.setLevel(logging.ERROR)
    logging.getLogger("accelerate").setLevel(logging.ERROR)

    entries = [e for e in matrix.default_matrix() if a.only in e.name]
    rows, failures = [], 0
    for entry in entries:
        for fmt in entry.formats:
            em = matrix.make(a.mst_plan, entry, fmt, a.out_dir)
            if em.error:
                rows.append((entry.name, fmt, "NO PLAN", em.error))
                failures += 1
                continue
            if "ds_config.json" not in em.files:  # an axolotl plan without DeepSpeed (one GPU)
                rows.append((entry.name, fmt, "no ds_config", ""))
                continue
            s = em.plan["setup"]
            layout = f"dp {s['dp']} sp {s['sp']} ZeRO {s['zero_stage']} mb {s['micro_batch']} ga {s['grad_accum']}"
            model_config = jobs.load_model_config(jobs.resolve_model(em.plan["model"])[1])
            problems = ds_check.check(json.loads(em.files["ds_config.json"].read_text()), em.plan, model_config,
                                      str(a.out_dir / "trainer"))
            rows.append((entry.name, fmt, "ok" if not problems else "REFUSED", layout if not problems else problems[0]))
            failures += bool(problems)
    width = max(len(r[0]) for r in rows) if rows else 10
    for name, fmt, status, what in rows:
        print(f"{name:<{width}}  {fmt:<9}  {status:<12}  {what}")
    checked = sum(1 for r in rows if r[2] in ("ok", "REFUSED"))
    print(f"{checked} ds_config.json files from {len(entries)} plans through transformers' Trainer, accelerate and "
          f"deepspeed.initialize: {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
