"""What the decomposition is used for: ``retrieve/`` (retrieval by feature: component groups, exact
search, the index folder, and ``search_store``, the whole query), ``heatmap`` (token maps, their
geometry and drawing) with ``heatmap_run`` (``heatmaps_for_images``: maps of image files in one
call), ``debias`` (removing a spurious cue; ``run_debias``) and ``segmentation/`` (zero-shot
segmentation, its metrics, its harness with ``segmentation_benchmark``, and the attention /
relevance baselines it is measured against). Each ``vitdecomp`` command of these applications is a
thin shell over one of these functions.
Built on :mod:`vitdecomp.core`, :mod:`vitdecomp.store` and :mod:`vitdecomp.interpret`.
"""
