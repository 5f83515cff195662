"""The exact decomposition: a stock model in, a checked :class:`ComponentStack` out.

``loading`` (``load("timm:...")``, ``synth:KIND``) and ``model`` (:class:`Model`, ``wrap``) build
the model; ``adapters/`` read each library's modules (one per family); ``engines/`` run the
hooked forward pass and write the direct effects (one per architecture shape: ViT, Swin,
MaxViT); ``capture`` holds the scoped hooks, ``readout`` the frozen final norm / pooling /
projection; ``stack`` and ``labels`` are the currency every later layer takes;
``decomposition`` is the entry point (``decompose``, ``iter_decompose``) and its exactness check.

Nothing here imports any other vitdecomp folder except :mod:`vitdecomp.errors`.
"""
