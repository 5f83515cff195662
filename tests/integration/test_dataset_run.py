"""Dataset runs into a store: content, skipped files, resume after a kill, torchrun, mismatches."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitdecomp as vd
from vitdecomp.data.datasets import load_batch, open_dataset
from vitdecomp.store.dataset_run import decompose_dataset, load_chunk_stats
from vitdecomp.store.component_store import ComponentStore, StoreMismatchError

MODEL = "timm:test_vit"
ARRAYS = ("components", "reference", "valid", "ids", "targets")


def make_folder(root: Path, n_per_class: int = 5, corrupt: bool = True) -> Path:
    rng = np.random.default_rng(0)
    for c in ("a_class", "b_class"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            size = (24 + 3 * i, 30 + 2 * i)
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / c / f"img{i:03d}.png")
    if corrupt:
        (root / "b_class" / "broken.png").write_bytes(b"\x89PNG not really")
        Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(root / "a_class" / "tiny.png")
    return root


def chunk_files(store: Path) -> dict[str, bytes]:
    """Every data chunk file and per-chunk statistics file, by relative path."""
    out = {}
    for name in ARRAYS:
        for f in sorted((store / name).rglob("*")):
            if f.is_file():
                out[str(f.relative_to(store))] = f.read_bytes()
    for f in sorted((store / "stats").rglob("*.npz")):
        out[str(f.relative_to(store))] = f.read_bytes()
    return out


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "vitdecomp", *args], capture_output=True, text=True,
                          env=env, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def model():
    return vd.load(MODEL, pretrained=False)


def test_store_holds_exactly_what_decompose_returns(model, tmp_path):
    data = make_folder(tmp_path / "data")
    run = decompose_dataset(model, data, tmp_path / "s.zarr", batch_size=4, store_dtype="float32", progress=False)
    store = ComponentStore.open(tmp_path / "s.zarr")
    source = open_dataset(data)
    assert run.manifest["complete"] and store.n_items == len(source) == 12
    assert run.manifest["counts"]["skipped"] == 2
    reasons = {s["id"]: s["reason"] for s in run.manifest["skipped"]}
    assert set(reasons) == {"b_class/broken.png", "a_class/tiny.png"}
    assert "smaller" in reasons["a_class/tiny.png"]
    rows = store.components(slice(0, store.n_items))
    assert rows.ids == [source.id(i) for i in range(len(source))]  # row i is item i
    assert rows.valid.tolist() == [i not in reasons for i in rows.ids]
    for index in range(store.n_chunks):  # every chunk equals decompose() on the same batch
        batch = load_batch(source, store.chunk_rows(index), model.transform)
        if batch.pixels is None:
            continue
        stack = vd.decompose(model, batch.pixels)
        sl = slice(batch.rows.start, batch.rows.stop)
        got = rows.values[sl][batch.valid]
        torch.testing.assert_close(got, stack.values.movedim(1, 0), rtol=0, atol=0)
        assert torch.isnan(rows.values[sl][~batch.valid]).all()
    # class labels from the folders are stored (-1 for skipped rows), and accuracy reads them
    targets = store.targets(slice(0, store.n_items))
    assert targets.tolist() == [-1 if i in reasons else source.label(k) for k, i in enumerate(rows.ids)]
    w = torch.randn(2, rows.reference.shape[-1], generator=torch.Generator().manual_seed(0))
    acc = store.accuracy(w)
    ref = rows.reference[rows.valid].double()
    expect = ((ref @ w.double().T).argmax(-1).numpy() == targets[rows.valid.numpy()]).mean()
    assert acc["n"] == 10 and acc["accuracy"] == pytest.approx(expect)
    # the merged in-pass statistics are the mean over valid images of the exact values
    moments, chunks = store.load_moments("moments")
    assert chunks == list(range(store.n_chunks)) and moments.count == 10
    valid_values = rows.values[rows.valid].double()  # [n, comp, d] (float32 store: exact values)
    np.testing.assert_allclose(moments.mean, valid_values.mean(0).numpy(), rtol=1e-9, atol=1e-12)


def test_interrupted_chunk_is_recomputed_bit_for_bit(model, tmp_path):
    data = make_folder(tmp_path / "data")
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    decompose_dataset(model, data, a, batch_size=3, progress=False)
    first = decompose_dataset(model, data, b, batch_size=3, progress=False, max_chunks=2)
    assert not first.manifest["complete"] and first.chunks_done == [0, 1]
    # a writer killed after writing chunk 1's rows but before its done record: garbage rows,
    # a statistics file, no record
    store = ComponentStore.open(b, mode="r+")
    store._array("components")[3:6] = np.zeros((3, *store.comp_shape), dtype=np.float16)
    (b / "done" / "000001.json").unlink()
    resumed = decompose_dataset(model, data, b, batch_size=3, progress=False)
    assert resumed.chunks_done == [1, 2, 3]  # chunk 0 was not redone
    assert resumed.manifest["complete"]
    assert chunk_files(a) == chunk_files(b)
    ma, _ = ComponentStore.open(a).load_moments("moments")
    mb, _ = ComponentStore.open(b).load_moments("moments")
    assert ma.count == mb.count and np.array_equal(ma.mean, mb.mean)


def test_cli_killed_mid_run_resumes_to_the_uninterrupted_store(tmp_path):
    data = make_folder(tmp_path / "data", n_per_class=30, corrupt=False)
    args = ["decompose", MODEL, "--no-pretrained", str(data), "--batch-size", "2", "-q"]
    ref = cli(*args, "--out", str(tmp_path / "ref.zarr"))
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed.zarr"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "vitdecomp", *args, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "done").is_dir() and len([f for f in os.listdir(out / "done") if f[0].isdigit()]) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    partial = ComponentStore.open(out)
    n_done = len(partial.done_chunks())
    assert 3 <= n_done < partial.n_chunks
    again = cli(*args, "--out", str(out), "--json")
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["complete"] and summary["this_run"]["chunks"] == partial.n_chunks - n_done
    assert chunk_files(tmp_path / "ref.zarr") == chunk_files(out)
    ref_m = ComponentStore.open(tmp_path / "ref.zarr").load_moments("moments")[0]
    out_m = ComponentStore.open(out).load_moments("moments")[0]
    assert np.array_equal(ref_m.mean, out_m.mean) and ref_m.count == out_m.count == 60


def test_torchrun_two_gloo_ranks_write_one_store(tmp_path):
    data = make_folder(tmp_path / "data", n_per_class=4)
    single = cli("decompose", MODEL, "--no-pretrained", str(data), "--batch-size", "2", "-q",
                 "--out", str(tmp_path / "one.zarr"))
    assert single.returncode == 0, single.stderr
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "vitdecomp", "decompose", MODEL, "--no-pretrained", str(data), "--batch-size", "2", "-q",
         "--out", str(tmp_path / "two.zarr"), "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    manifest = json.loads((tmp_path / "two.zarr" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"]["ranks"] == [0, 1]
    records = [json.loads(f.read_text()) for f in sorted((tmp_path / "two.zarr" / "done").glob("*.json"))]
    assert [r["rank"] for r in records] == [i % 2 for i in range(len(records))]
    assert chunk_files(tmp_path / "one.zarr") == chunk_files(tmp_path / "two.zarr")


def test_a_different_configuration_or_dataset_is_refused(model, tmp_path):
    data = make_folder(tmp_path / "data", corrupt=False)
    out = tmp_path / "s.zarr"
    decompose_dataset(model, data, out, batch_size=4, progress=False, max_chunks=1)
    with pytest.raises(StoreMismatchError, match="granularity"):
        decompose_dataset(model, data, out, batch_size=4, granularity="layer", progress=False)
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(data / "a_class" / "new.png")
    with pytest.raises(StoreMismatchError, match="dataset"):
        decompose_dataset(model, data, out, batch_size=4, progress=False)
    other = vd.load(MODEL, pretrained=False, seed=1)  # same name, other random weights
    (data / "a_class" / "new.png").unlink()
    with pytest.raises(StoreMismatchError, match="weights_digest"):
        decompose_dataset(other, data, out, batch_size=4, progress=False)
    result = cli("decompose", MODEL, "--no-pretrained", str(data), "--out", str(out), "--batch-size", "4",
                 "--granularity", "layer")
    assert result.returncode == 2 and "granularity" in result.stderr


def test_random_weights_are_reproducible_and_leave_the_callers_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b = vd.load(MODEL, pretrained=False), vd.load(MODEL, pretrained=False)
    assert torch.equal(torch.get_rng_state(), state)
    for (n, p), (_, q) in zip(a.module.named_parameters(), b.module.named_parameters()):
        assert torch.equal(p, q), n
    c = vd.load(MODEL, pretrained=False, seed=1)
    assert not all(torch.equal(p, q) for p, q in zip(a.module.parameters(), c.module.parameters()))


def test_token_stacks_and_covariance_statistics(model, tmp_path):
    data = make_folder(tmp_path / "data", n_per_class=3, corrupt=False)
    d_z = model.representation(model.example_input(1)).shape[-1]
    basis = torch.randn(3, d_z, generator=torch.Generator().manual_seed(0))
    run = decompose_dataset(model, data, tmp_path / "t.zarr", batch_size=4, granularity="head_token",
                            start_layer=-1, store_dtype="float32", stats_directions=basis, progress=False)
    store = run.store
    assert store.tokens is not None and len(store.comp_shape) == 3
    cov, _ = store.load_moments("moments-cov")
    rows = store.components(slice(0, store.n_items))
    proj = rows.values.double().sum(2) @ basis.double().T  # [n, comp, 3]
    np.testing.assert_allclose(cov.mean, proj.mean(0).numpy(), rtol=1e-6, atol=1e-9)
    expect = np.stack([np.cov(proj[:, c].numpy().T) for c in range(proj.shape[1])])
    np.testing.assert_allclose(cov.covariance, expect, rtol=1e-5, atol=1e-8)
    assert set(load_chunk_stats(store, 0)) == {"mean", "cov"}


def test_synthetic_waterbirds_end_to_end_through_the_cli(tmp_path):
    """`vitdecomp synth generate --spurious` writes a Waterbirds root that `decompose --out` reads
    (kind detected, test split only), storing the class label y as the target."""
    from vitdecomp.cli.main import main

    root = tmp_path / "wb"
    assert main(["synth", "generate", str(root), "--n", "24", "--spurious", "0.9", "--seed", "3", "-q"]) == 0
    assert main(["synth", "generate", str(root), "--n", "24", "-q"]) == 2  # refuses to overwrite
    assert main(["synth", "-q"]) == 2  # no action: help, bad-input exit code
    store_path = tmp_path / "wb.zarr"
    code = main(["decompose", MODEL, "--no-pretrained", str(root), "--split", "test", "--out", str(store_path),
                 "--batch-size", "4", "-q"])
    assert code == 0
    store = ComponentStore.open(store_path)
    source = open_dataset(root, split="test")
    assert source.name == "waterbirds" and store.n_items == len(source) > 0
    assert store.config.extra["dataset"] == source.fingerprint()
    assert store.targets(slice(0, store.n_items)).tolist() == [source.label(i) for i in range(len(source))]
    assert store.manifest()["complete"]


def test_decoding_workers_write_the_same_store(model, tmp_path):
    data = make_folder(tmp_path / "data", n_per_class=4)
    plain = decompose_dataset(model, data, tmp_path / "a.zarr", batch_size=3, progress=False)
    workers = decompose_dataset(model, open_dataset(data), tmp_path / "b.zarr", batch_size=3, progress=False,
                                num_workers=2)
    assert plain.manifest["complete"] and workers.manifest["complete"]
    assert chunk_files(tmp_path / "a.zarr") == chunk_files(tmp_path / "b.zarr")
    assert workers.skipped == plain.skipped and len(workers.skipped) == 2
