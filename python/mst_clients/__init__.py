"""The trainers' own code as the test of what ``mst-plan emit`` writes.

``mst_clients.matrix`` makes a matrix of plans with the ``mst-plan`` binary (``recommend --for
FORMAT``) and emits each in the formats that carry a DeepSpeed config; ``mst_clients.deepspeed``
feeds every ``ds_config.json`` through the Hugging Face Trainer's DeepSpeed integration and then
DeepSpeed's own ``DeepSpeedConfig`` on a process group of the plan's world size, and checks that
the batch DeepSpeed derives is the plan's. ``python -m mst_clients`` (``scripts/check-clients``)
runs both and prints one row per file.
"""
