"""mst-plan's referee and cross-check: a real PyTorch + transformers training step under an
mst-plan setup, measured.

* :mod:`mst_referee.jobs` resolves runs (model, setup, hf-mst config) in pure Python;
* :mod:`mst_referee.train` runs one on a device: ``cuda`` (torch's allocator statistics),
  ``cpu``, or ``fake`` (the referee: full size on fake tensors, every storage recorded);
* :mod:`mst_referee.records` writes the mst-measure/1 records mst-plan's ``compare`` and
  ``report`` read; :mod:`mst_referee.cli` is ``scripts/torch_crosscheck.py``.
"""
