"""vitdecomp.store.provenance: run records that pin a result to its inputs."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vitdecomp import ComponentLabel, ComponentStack
from vitdecomp.store.provenance import check_inputs, file_record, jsonable, run_record, store_record, write_json
from vitdecomp.store.component_store import ComponentStore, StoreConfig

LABELS = (ComponentLabel("embed"), ComponentLabel("head", 0, head=0), ComponentLabel("mlp", 0))


def _store(path: Path, n: int = 4, seed: int = 0) -> ComponentStore:
    cfg = StoreConfig(model="tiny", weights="random-init", dtype="float32", n_items=n, batch_size=2,
                      preprocessing={"size": 8}, package_version="0.1.0")
    store = ComponentStore.create_or_open(path, cfg, labels=[str(x) for x in LABELS], comp_shape=(3, 5))
    gen = torch.Generator().manual_seed(seed)
    for index in store.pending_chunks():
        rows = store.chunk_rows(index)
        values = torch.randn(3, len(rows), 5, generator=gen, dtype=torch.float64)
        store.write_chunk(index, ComponentStack(values, LABELS, values.sum(0)), [f"i{r}" for r in rows], {})
    store.finalize()
    return store


def test_jsonable_converts_what_json_cannot_hold() -> None:
    out = jsonable({"p": Path("/a/b"), "t": (1, 2), "s": {3, 1}, "nan": float("nan"), "inf": math.inf,
                    "np": np.float32(0.5), "arr": np.arange(3), "tensor": torch.tensor([1.5]), 4: None})
    assert out == {"p": "/a/b", "t": [1, 2], "s": [1, 3], "nan": None, "inf": None, "np": 0.5, "arr": [0, 1, 2],
                   "tensor": [1.5], "4": None}
    json.dumps(out, allow_nan=False)  # strict JSON


def test_run_record_links_store_pool_files_and_arguments(tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    inp = tmp_path / "classes.txt"
    inp.write_text("cat\ndog\n")
    args = argparse.Namespace(store=tmp_path / "s", k=5, run=lambda a: 0)
    rec = run_record("score", args, store=store, pool={"name": "feature/colour", "sha256": "ab"},
                     files={"classes": inp}, extra={"seed": 3})
    assert rec["command"] == "score" and rec["arguments"] == {"store": str(tmp_path / "s"), "k": 5}
    assert rec["store"]["config_hash"] == store.config.hash() and rec["store"]["n_items"] == 4
    assert rec["store"]["manifest_sha256"] == file_record(tmp_path / "s" / "manifest.json")["sha256"]
    import hashlib

    assert rec["files"]["classes"]["sha256"] == hashlib.sha256(b"cat\ndog\n").hexdigest()
    assert rec["extra"] == {"seed": 3} and rec["versions"]["vitdecomp"]
    json.dumps(rec, allow_nan=False)


def test_check_inputs_finds_changed_files_and_stores(tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    inp = tmp_path / "classes.txt"
    inp.write_text("cat\n")
    rec = run_record("x", {}, store=store, files={"classes": inp})
    assert check_inputs(rec) == []
    inp.write_text("dog\n")
    assert any("classes" in p and "changed" in p for p in check_inputs(rec))
    inp.unlink()
    assert any("missing" in p for p in check_inputs(rec))
    # a store rebuilt with other values at the same path: same config, other manifest
    rec = run_record("x", {}, store=store)
    import shutil

    shutil.rmtree(tmp_path / "s")
    _store(tmp_path / "s", n=6)
    problems = check_inputs(rec)
    assert any("n_items" in p for p in problems)


def test_store_record_without_manifest_and_write_json(tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").unlink()
    assert store_record(store)["manifest_sha256"] is None
    out = write_json(tmp_path / "deep" / "r.json", {"a": float("nan"), "b": Path("x")})
    assert json.loads(out.read_text()) == {"a": None, "b": "x"}
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["r.json"]  # no temp file left
