"""The configuration key of a component store: what a store holds, hashed and diffed.

A store's content is a function of its :class:`StoreConfig` (model, weights, decomposition
arguments, preprocessing, storage dtype, layout, package version, extras). The config is
serialised to canonical JSON (sorted keys, tuples as lists, no NaN), its sha256 keys the store
(:meth:`StoreConfig.hash`), and :meth:`StoreConfig.diff` lists field by field (nested keys
dotted) what differs between two configs, which is what :class:`StoreMismatchError` reports
when a store is reopened with another configuration.

Split from :mod:`vitdecomp.store.component_store` (which re-exports both names): the key is
plain data with no zarr or torch, and is what the store, the dataset runs and the provenance
records all compare.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError

__all__ = ["STORE_DTYPES", "StoreConfig", "StoreMismatchError", "package_version"]

#: Storage dtypes of a store's ``components`` array.
STORE_DTYPES = ("float16", "float32")


class StoreMismatchError(InputError):
    """An existing store was made with a different configuration (the message lists what differs)."""


def package_version() -> str:
    """The running vitdecomp version (the default ``StoreConfig.package_version``, and the manifest's)."""
    from .. import __version__

    return str(__version__)


def _canonical(obj: Any) -> Any:
    """JSON round trip: tuples become lists, keys become strings; raises on non-JSON values."""
    return json.loads(json.dumps(obj, sort_keys=True, allow_nan=False))


@dataclass(frozen=True)
class StoreConfig:
    """Everything that determines what a store holds; its :meth:`hash` keys the store.

    Attributes:
        model: model name / load spec.
        weights: weights identity (``Model.weights``: ``"pretrained:<tag>"``, ``"checkpoint:<sha>"``...).
        granularity, start_layer, ln_mode, bias_mode, mlp_neurons, normalize: the
            :func:`vitdecomp.decompose` arguments.
        dtype: storage dtype of ``components``: ``"float16"`` or ``"float32"``.
        preprocessing: ``Model.preprocessing.to_json()``.
        n_items: number of images (rows) in the store.
        batch_size: rows per chunk.
        package_version: vitdecomp version that wrote the store (default: the running one).
        extra: anything else that changes the content (dataset id, directions hash, ...).
    """

    model: str
    weights: str
    granularity: str = "head"
    start_layer: int = 0
    ln_mode: str = "centered"
    bias_mode: str = "explicit"
    mlp_neurons: bool = False
    normalize: bool = False
    dtype: str = "float16"
    preprocessing: dict[str, Any] = field(default_factory=dict)
    n_items: int = 0
    batch_size: int = 256
    package_version: str = field(default_factory=package_version)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in STORE_DTYPES:
            raise InputError(f"store dtype must be one of {STORE_DTYPES}, got {self.dtype!r}")
        if self.n_items < 0:
            raise InputError(f"n_items must be >= 0, got {self.n_items}")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}")
        try:
            _canonical(self.preprocessing)
            _canonical(self.extra)
        except (TypeError, ValueError) as exc:
            raise InputError(f"store config must be JSON-serialisable: {exc}") from None

    @classmethod
    def from_model(cls, model: Any, *, n_items: int, batch_size: int, **kwargs: Any) -> StoreConfig:
        """Config for a :class:`~vitdecomp.Model` (name, weights id and preprocessing taken from it)."""
        prep = getattr(model, "preprocessing", None)
        prep_json = prep.to_json() if prep is not None and hasattr(prep, "to_json") else {}
        return cls(model=model.name, weights=model.weights, preprocessing=prep_json,
                   n_items=n_items, batch_size=batch_size, **kwargs)

    def to_json(self) -> dict[str, Any]:
        """Canonical JSON-able dict of every field."""
        return _canonical(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StoreConfig:
        """Inverse of :meth:`to_json`; InputError for fields this version does not know."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise InputError(f"store config has unknown fields {sorted(unknown)} (written by a newer vitdecomp?)")
        return cls(**dict(data))

    def hash(self) -> str:
        """First 16 hex digits of the sha256 of the canonical JSON of every field."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def diff(self, other: StoreConfig) -> list[str]:
        """Human-readable differences, ``"field: <self> != <other>"`` (nested dict keys dotted)."""
        out: list[str] = []
        _diff(self.to_json(), other.to_json(), "", out)
        return out

    @property
    def n_chunks(self) -> int:
        """Number of chunks, ``ceil(n_items / batch_size)``."""
        return -(-self.n_items // self.batch_size)


def _diff(a: Any, b: Any, prefix: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in a:
                out.append(f"{name}: <absent> != {b[key]!r}")
            elif key not in b:
                out.append(f"{name}: {a[key]!r} != <absent>")
            else:
                _diff(a[key], b[key], name, out)
    elif a != b:
        out.append(f"{prefix}: {a!r} != {b!r}")
