"""gravprobe.probes — does Newton's law live in the model? (METHOD.md §4)

Modules (import the one you need; none imports PySR, and only ``linear``, ``force_head`` and the
stage's functions import torch, lazily):

- :mod:`gravprobe.probes.symbolic` — ``fit_equation(X, y, names, *, backend="auto", seed=0, **options)``
  (PySR or the offline Operon engine) → ``SRResult(expression, table, backend, ...)``;
- :mod:`gravprobe.probes.verdict` — ``compare_to_newton(expression, X, y, names=("r", "m1", "m2"))``;
- :mod:`gravprobe.probes.data` — planet steps, the nearest-to-training selection, galaxies, the 2-NN oracle;
- :mod:`gravprobe.probes.linear` — activation capture and ridge / MLP probes per layer;
- :mod:`gravprobe.probes.force_head` — the fine-tuned force head;
- :mod:`gravprobe.probes.pipeline` — ``main(cfg, run_dir)``, the ``gravprobe probe`` stage.
"""
