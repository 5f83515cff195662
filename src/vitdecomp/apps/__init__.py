"""What the decomposition is used for: ``retrieve`` (retrieval by feature), ``heatmap`` (token
maps), ``debias`` (removing a spurious cue) and ``segmentation/`` (zero-shot segmentation, its
metrics, its harness, and the attention / relevance baselines it is measured against).
Built on :mod:`vitdecomp.core`, :mod:`vitdecomp.store` and :mod:`vitdecomp.interpret`.
"""
