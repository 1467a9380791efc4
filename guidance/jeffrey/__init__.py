"""Jeffrey marginal guidance (arXiv 2606.13240) and everything only it uses.

* :mod:`.class_guidance` -- the term on class labels (:class:`JeffreyGuidance`); its ``prepare``
  step (:class:`~diffsample.guidance.term.Preparable`) fills a missing model marginal before a run;
* :mod:`.embedding_guidance` -- the term toward a target set of feature embeddings;
* :mod:`.class_marginal` -- targets and class marginals (parsing, estimates, the JSON files);
* :mod:`.model_marginal` -- the model marginal ``p_theta(y)`` estimated from unguided samples of
  the run's sampler (through the run's :class:`~diffsample.guidance.term.PrepareContext`), cached;
* :mod:`.twist` -- twisted SMC particles (TDS, arXiv 2306.17775) for the term.
"""
