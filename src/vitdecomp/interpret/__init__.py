"""Reading components: text and CLIP space.

``text/`` (encoders, shipped pools, templates, the embedding cache), ``align`` (CompAlign maps
of any model's components into a CLIP space), ``textspan`` (per-head text bases), ``score``
(feature scores of components) and ``ablate`` (mean / zero / resample ablations). Built on
:mod:`vitdecomp.core` and :mod:`vitdecomp.store`.
"""
