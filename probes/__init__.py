"""gravprobe.probes — does Newton's law live in the model? (METHOD.md §4)

Modules (import the one you need; none imports PySR or matplotlib — the stage writes numbers and
``gravprobe.report`` draws them — and torch is imported lazily, inside the functions that run a model):

- :mod:`gravprobe.probes.symbolic` — ``fit_equation(X, y, names, *, backend="auto", seed=0, **options)``
  (PySR or the offline Operon engine) → ``SRResult(expression, table, backend, ...)``;
- :mod:`gravprobe.probes.verdict` — ``compare_to_newton(expression, X, y, names=("r", "m1", "m2"))``;
- :mod:`gravprobe.probes.data` — planet steps, the nearest-to-training selection, galaxies, the 2-NN oracle;
- :mod:`gravprobe.probes.linear` — the model input (``model_inputs``), activation capture and ridge / MLP
  probes per layer;
- :mod:`gravprobe.probes.readouts` — Liu et al.'s last-position readouts and attention mass;
- :mod:`gravprobe.probes.force_head` — the fine-tuned force head;
- :mod:`gravprobe.probes.pipeline` — ``main(cfg, run_dir)``, the ``gravprobe probe`` stage (one function per
  probe; ``run_probes`` runs them in order).
"""
