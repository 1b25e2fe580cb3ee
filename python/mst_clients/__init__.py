"""The trainers' own code as the test of what ``mst-plan emit`` writes.

``mst_clients.matrix`` makes a matrix of plans with the ``mst-plan`` binary (``recommend --for
FORMAT``) and emits each. ``python -m mst_clients`` takes every ``ds_config.json`` (the deepspeed
format's, and the axolotl format's when its plan uses DeepSpeed) through the Hugging Face Trainer,
accelerate and ``deepspeed.initialize`` to a built engine at the plan's world size
(``mst_clients.ds_check``); ``python -m mst_clients.titan`` takes every ``mst_torchtitan.py``
through torchtitan 0.3.0's ``ConfigManager``; ``python -m mst_clients.axolotl_check`` takes every
``axolotl.yaml`` through Axolotl 0.21.0's ``load_cfg`` steps (in its own Python 3.12 environment).
Each checks that what the client made of a file is the plan, and prints one row per file;
``scripts/check-clients`` runs all three.
"""
