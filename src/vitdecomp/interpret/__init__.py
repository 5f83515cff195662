"""Reading components: text and CLIP space.

``text/`` (encoders, shipped pools, templates, the embedding cache), ``align/`` (CompAlign maps
of any model's components into a CLIP space), ``textspan/`` (per-head text bases), ``score/``
(feature scores of components) and ``ablate/`` (mean / zero / resample ablations). Each of the
four is a package of the method's maths plus ``run``: the function its command calls on a store
(:func:`~vitdecomp.interpret.align.fit_alignment`, :func:`~vitdecomp.interpret.textspan.label_store`,
:func:`~vitdecomp.interpret.score.score_store`, :func:`~vitdecomp.interpret.ablate.run_ablation`);
``inputs`` holds what those share (a finished store, a checked alignment, class files, which model
to load). Built on :mod:`vitdecomp.core` and :mod:`vitdecomp.store`.
"""
