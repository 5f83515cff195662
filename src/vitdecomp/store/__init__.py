"""Dataset scale: the on-disk component store and the runs that fill it.

``component_store`` (the zarr store: config key, chunks, manifests, streaming statistics),
``dataset_run`` (``decompose_dataset``: resumable, one chunk per batch), ``distributed``
(torchrun ranks) and ``provenance`` (run records that pin results to their inputs).

The store's API is importable from here (``from vitdecomp.store import ComponentStore``).
"""
from .component_store import *  # noqa: F401,F403  (the store's public API, as before the move)
from .component_store import __all__  # noqa: F401
