"""Run records: what a command read and how it was called, so every number can be reproduced.

Every command that writes results (``label``, ``score``, ``align``, ``ablate``, ``retrieve``,
``segment``, ``debias`` ...) puts a :func:`run_record` under the key ``"run"`` of its JSON. The
record links the results to their inputs: the store (path, configuration hash, the sha256 of its
``manifest.json`` and the number of items), the text pool (name, version, sha256), any other
input file (sha256), the command's arguments, and the package versions. Re-running the recorded
``argv`` on inputs with the recorded hashes gives the same numbers; :func:`check_inputs` says
which recorded input changed since.

Example::

    payload = {"run": run_record("score", args, store=store, pool=pool.manifest()), "scores": ...}
    write_json(args.out / "score.json", payload)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .component_store import ComponentStore

__all__ = ["run_record", "store_record", "file_record", "write_json", "check_inputs", "jsonable"]

RECORD_FORMAT = "vitdecomp.run/1"


def jsonable(value: Any) -> Any:
    """``value`` with paths as strings, tuples as lists, arrays as lists, NaN/inf as ``None`` and other
    non-JSON values as ``repr``."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [jsonable(v) for v in items]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return jsonable(value.tolist())
    if callable(value):
        return None
    return repr(value)


def file_record(path: str | Path) -> dict[str, Any]:
    """``{"path", "bytes", "sha256"}`` of a file (streamed in 1 MiB blocks)."""
    p = Path(path)
    digest = hashlib.sha256()
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(p), "bytes": p.stat().st_size, "sha256": digest.hexdigest()}


def store_record(store: ComponentStore) -> dict[str, Any]:
    """What identifies a store's content: path, configuration (and its hash), items, labels'
    sha256, and the sha256 of ``manifest.json`` when the store was finalized."""
    labels = hashlib.sha256("\n".join(store.labels).encode()).hexdigest()
    manifest = store.path / "manifest.json"
    return {
        "path": str(store.path),
        "config": store.config.to_json(),
        "config_hash": store.config.hash(),
        "n_items": store.n_items,
        "labels_sha256": labels,
        "chunks_done": len(store.done_chunks()),
        "manifest_sha256": file_record(manifest)["sha256"] if manifest.is_file() else None,
    }


def run_record(
    command: str,
    args: argparse.Namespace | Mapping[str, Any] | None = None,
    *,
    store: ComponentStore | None = None,
    stores: Mapping[str, ComponentStore] | None = None,
    pool: Mapping[str, Any] | None = None,
    files: Mapping[str, str | Path] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A JSON-able record of one run.

    Args:
        command: the subcommand (``"score"``) or API function (``"vd.retrieve"``).
        args: parsed arguments (a Namespace; ``run`` callables are dropped) or a mapping.
        store: the store read (see :func:`store_record`); ``stores`` for several, by role.
        pool: a text pool's ``manifest()`` (name, version, sha256).
        files: other inputs by role; each gets :func:`file_record`.
        extra: anything else to record (seeds, derived settings).
    """
    from .. import __version__

    arg_map = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    arguments = {k: jsonable(v) for k, v in sorted(arg_map.items()) if k != "run" and not callable(v)}
    record: dict[str, Any] = {
        "format": RECORD_FORMAT,
        "command": command,
        "argv": list(sys.argv),
        "arguments": arguments,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _versions(__version__),
    }
    if store is not None:
        record["store"] = store_record(store)
    if stores:
        record["stores"] = {role: store_record(s) for role, s in stores.items()}
    if pool is not None:
        record["pool"] = jsonable(dict(pool))
    if files:
        record["files"] = {role: file_record(p) for role, p in files.items()}
    if extra:
        record["extra"] = jsonable(dict(extra))
    return record


def _versions(package: str) -> dict[str, str]:
    out = {"vitdecomp": package, "python": platform.python_version()}
    for name in ("torch", "numpy", "timm", "open_clip", "transformers", "zarr", "faiss"):
        module = sys.modules.get(name)
        version = getattr(module, "__version__", None) if module is not None else None
        if version:
            out[name] = str(version)
    return out


def check_inputs(record: Mapping[str, Any]) -> list[str]:
    """Differences between a record's inputs and the files on disk now (empty: unchanged).

    Checks each recorded file's sha256 and each store's configuration hash, item count and
    manifest sha256.
    """
    from .component_store import ComponentStore

    problems: list[str] = []
    for role, rec in dict(record.get("files") or {}).items():
        path = Path(rec["path"])
        if not path.is_file():
            problems.append(f"{role}: {path} is missing")
        elif file_record(path)["sha256"] != rec["sha256"]:
            problems.append(f"{role}: {path} changed (sha256 differs)")
    stores = dict(record.get("stores") or {})
    if record.get("store"):
        stores["store"] = record["store"]
    for role, rec in stores.items():
        try:
            now = store_record(ComponentStore.open(rec["path"]))
        except Exception as exc:  # noqa: BLE001 - any failure to open is a difference
            problems.append(f"{role}: cannot open {rec['path']} ({exc})")
            continue
        for key in ("config_hash", "n_items", "labels_sha256", "manifest_sha256"):
            if now.get(key) != rec.get(key):
                problems.append(f"{role}: {key} was {rec.get(key)!r}, now {now.get(key)!r}")
    return problems


def write_json(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON atomically (temp file + rename); makes parent folders."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(jsonable(payload), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, p)
    return p
