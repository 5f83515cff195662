"""Dataset scale: the on-disk component store and the runs that fill it.

``component_store`` (the zarr store: layout, chunks, done records, manifests, reading rows and
batches), ``config`` (``StoreConfig``, the hashed configuration key, and ``StoreMismatchError``),
``moments`` (``RunningMoments``, streaming mean / covariance, and the moment files),
``dataset_run`` (``decompose_dataset``: resumable, one chunk per batch), ``distributed`` (torchrun
ranks) and ``provenance`` (run records that pin results to their inputs).

The store's API is importable from here (``from vitdecomp.store import ComponentStore``): the
names of ``component_store.__all__``, which re-exports those of ``config`` and ``moments``.
"""
from .component_store import *  # noqa: F401,F403  (the store's public API, as before the move)
from .component_store import __all__  # noqa: F401
