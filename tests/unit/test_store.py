"""vitdecomp.store on hand-made ComponentStacks (no models)."""
from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from vitdecomp import ComponentLabel, ComponentStack, InputError
from vitdecomp.store.component_store import ComponentStore, RunningMoments, StoreConfig, StoreMismatchError, StoreRows

N_ITEMS, BATCH, D = 10, 4, 6  # chunks of 4, 4, 2 rows


def _labels() -> tuple[ComponentLabel, ...]:
    labs = [ComponentLabel("embed")]
    for layer in range(2):
        labs += [ComponentLabel("head", layer, head=h) for h in range(2)]
        labs += [ComponentLabel("mlp", layer)]
    return tuple(labs + [ComponentLabel("const")])


LABELS = _labels()
NAMES = [str(lab) for lab in LABELS]


def _config(dtype: str = "float32", **kw: object) -> StoreConfig:
    base: dict[str, object] = {
        "model": "tiny_vit", "weights": "random-init", "dtype": dtype, "n_items": N_ITEMS, "batch_size": BATCH,
        "preprocessing": {"size": 32, "mean": [0.5, 0.5, 0.5]}, "package_version": "0.1.0",
    }
    base.update(kw)
    return StoreConfig(**base)  # type: ignore[arg-type]


def _ids(index: int) -> list[str]:
    start = index * BATCH
    return [f"img{r:03d}.jpg" for r in range(start, min(start + BATCH, N_ITEMS))]


SKIP = {"img005.jpg": "truncated JPEG", "img009.jpg": "image too small (4x4)"}


def _chunk(index: int) -> tuple[ComponentStack | None, list[str], dict[str, str]]:
    """Deterministic stack for the non-skipped items of chunk ``index``."""
    ids = _ids(index)
    skipped = {i: SKIP[i] for i in ids if i in SKIP}
    rows = [int(i[3:6]) for i in ids if i not in skipped]
    if not rows:
        return None, ids, skipped
    values = torch.stack([torch.randn(len(LABELS), D, generator=torch.Generator().manual_seed(r), dtype=torch.float64)
                          for r in rows], dim=1)  # [comp, batch, d]
    return ComponentStack(values, LABELS, values.sum(0)), ids, skipped


def _write(store: ComponentStore, indices: list[int]) -> None:
    for i in indices:
        stack, ids, skipped = _chunk(i)
        store.write_chunk(i, stack, ids, skipped, seconds=0.01)


def _create(path: Path, dtype: str = "float32") -> ComponentStore:
    return ComponentStore.create_or_open(path, _config(dtype), NAMES, (len(NAMES), D), D)


def _files(path: Path, *arrays: str) -> dict[str, bytes]:
    """Raw bytes of every chunk file of the given arrays."""
    out = {}
    for name in arrays:
        for f in sorted((path / name).rglob("*")):
            if f.is_file():
                out[str(f.relative_to(path))] = f.read_bytes()
    return out


ARRAYS = ("components", "reference", "valid", "ids")


# ------------------------------------------------------------------ config
def test_config_hash_stable_and_sensitive_to_every_field() -> None:
    cfg = _config()
    assert cfg.hash() == _config().hash() and len(cfg.hash()) == 16
    # key order of dicts does not matter
    same = _config(preprocessing={"mean": [0.5, 0.5, 0.5], "size": 32})
    assert same.hash() == cfg.hash()
    changes: dict[str, object] = {
        "model": "other", "weights": "pretrained:x", "granularity": "layer", "start_layer": 3, "ln_mode": "anchor",
        "bias_mode": "split", "mlp_neurons": True, "normalize": True, "dtype": "float16",
        "preprocessing": {"size": 64, "mean": [0.5, 0.5, 0.5]}, "n_items": 11, "batch_size": 5,
        "package_version": "0.2.0", "extra": {"dataset": "imagenet-val"},
    }
    assert set(changes) == {f.name for f in dataclasses.fields(StoreConfig)}
    for name, value in changes.items():
        other = dataclasses.replace(cfg, **{name: value})
        assert other.hash() != cfg.hash(), name
        diff = cfg.diff(other)
        assert len(diff) >= 1 and all(d.startswith(name) for d in diff), (name, diff)
    assert cfg.diff(dataclasses.replace(cfg, preprocessing={"size": 64, "mean": [0.5, 0.5, 0.5]})) == [
        "preprocessing.size: 32 != 64"
    ]
    with pytest.raises(InputError):
        _config(dtype="bfloat16")
    assert StoreConfig.from_json(cfg.to_json()) == cfg


def test_config_from_model() -> None:
    class Prep:
        def to_json(self) -> dict:
            return {"size": 224}

    class FakeModel:
        name, weights, preprocessing = "vit_b16", "pretrained:augreg", Prep()

    cfg = StoreConfig.from_model(FakeModel(), n_items=5, batch_size=2, granularity="layer")
    assert (cfg.model, cfg.weights, cfg.preprocessing, cfg.granularity) == ("vit_b16", "pretrained:augreg",
                                                                           {"size": 224}, "layer")


# ------------------------------------------------------------------ writing / resume
def test_create_write_reopen_pending(tmp_path: Path) -> None:
    store = _create(tmp_path / "s.zarr")
    assert store.n_chunks == 3 and store.pending_chunks() == [0, 1, 2]
    assert list(store.chunk_rows(2)) == [8, 9]
    _write(store, [0, 2])
    again = _create(tmp_path / "s.zarr")
    assert again.done_chunks() == [0, 2] and again.pending_chunks() == [1]
    assert again.pending_chunks(rank=0, world_size=2) == [] and again.pending_chunks(rank=1, world_size=2) == [1]
    assert not again.is_complete()
    m = again.finalize()
    assert not m["complete"] and m["pending_chunks"] == [1]
    _write(again, [1])
    m = again.finalize()
    assert m["complete"] and m["counts"]["valid"] == N_ITEMS - 2 and m["counts"]["rows_done"] == N_ITEMS
    assert json.loads((tmp_path / "s.zarr" / "manifest.json").read_text()) == m
    assert m["error"]["max"] < 1e-12 and m["error"]["stored_max"] < 1e-6
    assert m["config_hash"] == _config().hash()


def test_mismatched_config_raises_naming_the_field(tmp_path: Path) -> None:
    _create(tmp_path / "s.zarr")
    with pytest.raises(StoreMismatchError, match="start_layer: 3 != 0"):
        ComponentStore.create_or_open(tmp_path / "s.zarr", _config(start_layer=3), NAMES, (len(NAMES), D))
    with pytest.raises(StoreMismatchError, match="labels"):
        ComponentStore.create_or_open(tmp_path / "s.zarr", _config(), NAMES[::-1], (len(NAMES), D))
    assert issubclass(StoreMismatchError, InputError)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(InputError, match="not a vitdecomp store"):
        _create(tmp_path / "junk")


def test_skipped_items_recorded_with_reasons(tmp_path: Path) -> None:
    store = _create(tmp_path / "s.zarr")
    _write(store, [0, 1, 2])
    data = store.components(slice(None))
    assert isinstance(data, StoreRows)
    bad = [5, 9]
    assert data.valid.tolist() == [i not in bad for i in range(N_ITEMS)]
    assert torch.isnan(data.values[bad]).all() and torch.isnan(data.reference[bad]).all()
    assert data.ids == [f"img{r:03d}.jpg" for r in range(N_ITEMS)]
    m = store.manifest()
    assert m["counts"]["skipped"] == 2
    assert {(s["row"], s["id"], s["reason"]) for s in m["skipped"]} == {
        (5, "img005.jpg", "truncated JPEG"), (9, "img009.jpg", "image too small (4x4)")}
    # a chunk where every item failed
    rec = store.write_chunk(2, None, _ids(2), {i: "corrupt" for i in _ids(2)})
    assert rec["n_valid"] == 0 and rec["error"]["max"] is None
    assert (tmp_path / "s.zarr" / "components" / "c" / "2" / "0" / "0").is_file()  # empty chunk written
    with pytest.raises(InputError):
        store.write_chunk(0, None, _ids(0), {})  # items not skipped but no stack
    with pytest.raises(InputError):
        store.write_chunk(0, _chunk(0)[0], _ids(0)[:3], {})  # wrong number of ids


def test_simulated_kill_resume_is_bit_identical(tmp_path: Path) -> None:
    ref_store = _create(tmp_path / "ref.zarr")
    _write(ref_store, [0, 1, 2])

    store = _create(tmp_path / "s.zarr")
    _write(store, [0, 2])
    # killed after writing chunk 1's data but before its record ...
    store._array("components")[4:8] = np.zeros((4, len(NAMES), D), dtype=np.float32)  # partial/garbage data
    # ... and chunk 2's record lost too
    (tmp_path / "s.zarr" / "done" / "000002.json").unlink()

    resumed = _create(tmp_path / "s.zarr")
    assert resumed.pending_chunks() == [1, 2]
    with pytest.raises(InputError, match="not written yet"):
        resumed.components(slice(4, 8))
    _write(resumed, resumed.pending_chunks())
    assert resumed.is_complete()
    assert _files(tmp_path / "ref.zarr", *ARRAYS) == _files(tmp_path / "s.zarr", *ARRAYS)
    a, b = ref_store.manifest(), resumed.manifest()
    assert a["counts"] == b["counts"] and a["skipped"] == b["skipped"] and a["error"] == b["error"]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_precision(tmp_path: Path, dtype: str) -> None:
    store = _create(tmp_path / "s.zarr", dtype)
    _write(store, [0])
    stack, _, _ = _chunk(0)
    assert stack is not None
    data = store.components([0, 1, 2, 3])
    assert isinstance(data, StoreRows)
    want = stack.values.movedim(1, 0)
    assert data.values.dtype == getattr(torch, dtype)
    if dtype == "float32":
        assert torch.equal(data.values, want.float()) and torch.equal(data.reference, stack.reference.float())
    else:
        assert torch.allclose(data.values.double(), want, rtol=1e-3, atol=1e-4)
        assert torch.equal(data.values, want.half())
    back = store.components(slice(0, 4), as_stack=True)
    assert isinstance(back, ComponentStack)
    assert back.labels == LABELS and back.values.shape == (len(LABELS), 4, D)
    assert back.error() < (1e-3 if dtype == "float16" else 1e-6)
    assert back.meta["ids"] == _ids(0)
    # index arrays: any order, repeats
    picked = store.components(np.array([3, 0, 3]))
    assert isinstance(picked, StoreRows)
    assert torch.equal(picked.values, data.values[[3, 0, 3]]) and picked.ids == [_ids(0)[i] for i in (3, 0, 3)]


def test_token_store_round_trip(tmp_path: Path) -> None:
    from vitdecomp.core.stack import TokenInfo

    tokens = TokenInfo(types=("cls", "patch", "patch"), grid=(1, 2))
    cfg = _config(granularity="head_token", n_items=3, batch_size=2)
    store = ComponentStore.create_or_open(tmp_path / "t.zarr", cfg, NAMES, (len(NAMES), 3, D), tokens=tokens)
    values = torch.randn(len(NAMES), 2, 3, D, dtype=torch.float64)
    stack = ComponentStack(values, LABELS, values.sum((0, 2)), tokens=tokens)
    store.write_chunk(0, stack, ["a", "b"])
    out = store.components(slice(0, 2), as_stack=True)
    assert isinstance(out, ComponentStack)
    assert out.has_tokens and out.tokens == tokens and torch.equal(out.values, values.float())


def test_read_while_writing_sees_only_done_chunks(tmp_path: Path) -> None:
    writer = _create(tmp_path / "s.zarr")
    _write(writer, [1])
    reader = ComponentStore.open(tmp_path / "s.zarr")
    seen = list(reader.iter_batches(3))
    assert [s.meta["rows"] for s in seen] == [[4, 6, 7]]  # row 5 skipped
    with pytest.raises(InputError):
        reader.components([0])
    # write chunk 0's data without its record: still invisible
    stack, _, _ = _chunk(0)
    writer._array("components")[0:4] = stack.values.movedim(1, 0).float().numpy()  # type: ignore[union-attr]
    assert [s.meta["rows"] for s in reader.iter_batches(100)] == [[4, 6, 7]]
    _write(writer, [0, 2])
    batches = list(reader.iter_batches(3))
    rows = [r for s in batches for r in s.meta["rows"]]
    assert rows == [r for r in range(N_ITEMS) if r not in (5, 9)]
    assert [s.batch_size for s in batches] == [3, 3, 2]
    for s in batches:
        assert s.error() < 1e-6
        assert s.meta["ids"] == [f"img{r:03d}.jpg" for r in s.meta["rows"]]


# ------------------------------------------------------------------ multi-process
def _worker(path: str, rank: int, world: int) -> None:
    store = ComponentStore.create_or_open(path, _config(), NAMES, (len(NAMES), D), D)
    for i in store.pending_chunks(rank, world):
        stack, ids, skipped = _chunk(i)
        store.write_chunk(i, stack, ids, skipped, rank=rank)


def test_two_processes_write_one_store(tmp_path: Path) -> None:
    single = _create(tmp_path / "single.zarr")
    _write(single, [0, 1, 2])
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(tmp_path / "multi.zarr"), r, 2)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    multi = ComponentStore.open(tmp_path / "multi.zarr")
    assert multi.is_complete()
    assert _files(tmp_path / "single.zarr", *ARRAYS) == _files(tmp_path / "multi.zarr", *ARRAYS)
    assert multi.manifest()["counts"]["ranks"] == [0, 1]
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]  # the loser's temp dir is cleaned up


# ------------------------------------------------------------------ statistics
def test_running_moments_merge_equals_single_pass_and_numpy() -> None:
    gen = np.random.default_rng(0)
    x = gen.normal(size=(50, 3, 4)) * 2.0 + 100.0  # large mean: stability matters
    single = RunningMoments(3, 4, covariance=True).update(x)
    parts = [RunningMoments(3, 4, covariance=True).update(x[a:b]) for a, b in ((0, 7), (7, 30), (30, 30), (30, 50))]
    merged = parts[0]
    for p in parts[1:]:
        merged.merge(p)
    assert merged.count == single.count == 50
    np.testing.assert_allclose(merged.mean, single.mean, rtol=1e-12, atol=0)
    np.testing.assert_allclose(merged.covariance, single.covariance, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(single.mean, x.mean(0), rtol=1e-12)
    for c in range(3):
        np.testing.assert_allclose(single.covariance[c], np.cov(x[:, c].T), rtol=1e-10, atol=1e-12)
    restored = RunningMoments.from_state_dict(single.state_dict())
    assert restored.count == 50 and np.array_equal(restored.covariance, single.covariance)
    torch_in = RunningMoments(3, 4).update(torch.from_numpy(x))
    np.testing.assert_array_equal(torch_in.mean, single.mean)
    with pytest.raises(ValueError):
        _ = torch_in.covariance
    with pytest.raises(InputError):
        single.merge(torch_in)


def test_moments_saved_in_store_and_merged_across_ranks(tmp_path: Path) -> None:
    store = _create(tmp_path / "s.zarr")
    _write(store, [0, 1, 2])
    full = store.compute_moments(covariance=True)
    assert full.count == N_ITEMS - 2
    data = store.components(slice(None))
    assert isinstance(data, StoreRows)
    x = data.values[data.valid].double().numpy()
    np.testing.assert_allclose(full.mean, x.mean(0), rtol=1e-12, atol=1e-14)
    for rank, chunks in ((0, [0, 2]), (1, [1])):
        store.save_moments("mean", store.compute_moments(chunks=chunks, covariance=True), chunks, rank=rank)
    loaded, covered = store.load_moments("mean")
    assert covered == [0, 1, 2] and loaded.count == full.count
    np.testing.assert_allclose(loaded.mean, full.mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(loaded.covariance, full.covariance, rtol=1e-12, atol=1e-14)
    store.save_moments("mean", store.compute_moments(chunks=[1]), [1], rank=2)
    with pytest.raises(InputError, match="already counted"):
        store.load_moments("mean")
    proj = store.compute_moments(directions=torch.eye(D)[:2])
    np.testing.assert_allclose(proj.mean, full.mean[:, :2], rtol=1e-6, atol=1e-6)


def test_moment_files_round_trip_and_refuse_another_configuration(tmp_path: Path) -> None:
    from vitdecomp.store.moments import load_moments_files, save_moments_file

    gen = np.random.default_rng(1)
    x = gen.normal(size=(9, 2, 3))
    a = RunningMoments(2, 3, covariance=True).update(x[:4])
    b = RunningMoments(2, 3, covariance=True).update(x[4:])
    fa = save_moments_file(tmp_path / "a.npz", a, [3, 0], "cfg1")
    fb = save_moments_file(tmp_path / "b.npz", b, [1], "cfg1")
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]  # written via a temp file, then renamed
    merged, covered = load_moments_files([fa, fb], "cfg1")
    assert merged is not None and covered == [0, 1, 3] and merged.count == 9
    np.testing.assert_allclose(merged.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(merged.covariance[1], np.cov(x[:, 1].T), rtol=1e-10)
    with pytest.raises(InputError, match="another configuration"):
        load_moments_files([fa], "cfg2")
    assert load_moments_files([], "cfg1") == (None, [])


def test_split_modules_keep_the_old_import_paths() -> None:
    import vitdecomp
    import vitdecomp.store as store_pkg
    from vitdecomp.store import component_store, config, moments

    assert store_pkg.__all__ == ["ComponentStore", "RunningMoments", "StoreConfig", "StoreMismatchError", "StoreRows"]
    for name in store_pkg.__all__:
        assert getattr(store_pkg, name) is getattr(component_store, name)
    assert component_store.StoreConfig is config.StoreConfig
    assert component_store.StoreMismatchError is config.StoreMismatchError
    assert issubclass(config.StoreMismatchError, InputError)
    assert component_store.RunningMoments is moments.RunningMoments
    assert component_store.atomic_savez is moments.atomic_savez
    assert StoreConfig(model="m", weights="w").package_version == str(vitdecomp.__version__)
