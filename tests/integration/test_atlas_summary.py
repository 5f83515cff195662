"""The atlas summary of a store equals a brute-force computation on the stored rows, and refuses to
be read once the store it was built from has changed."""
from __future__ import annotations

import numpy as np
import pytest

from vitdecomp.cli.main import main
from vitdecomp.core.labels import kind_mask
from vitdecomp.explore.summary import SummaryStaleError, build_summary, load_summary
from vitdecomp.store.component_store import ComponentStore


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from vitdecomp.synth import generate_dataset

    root = tmp_path_factory.mktemp("atlas")
    generate_dataset(root / "world", 60, seed=4)
    out = root / "clip.zarr"
    assert main(["decompose", "synth:clip", str(root / "world" / "train"), "--out", str(out), "--batch-size", "16",
                 "--store-dtype", "float32"]) == 0
    return out


def test_summary_matches_brute_force(store):
    summary = build_summary(store, k=3, n_directions=2)
    st = ComponentStore.open(store)
    stacks = list(st.iter_batches())
    values = np.concatenate([s.sum_tokens().values.double().numpy() for s in stacks], axis=1)  # [comp, n, d]
    ref = np.concatenate([s.reference.double().numpy() for s in stacks])
    ids = [str(i) for s in stacks for i in s.meta["ids"]]
    rows = np.flatnonzero(kind_mask(list(st.labels)))
    assert summary.labels == [st.labels[i] for i in rows] and "bias" not in summary.labels
    for pos, i in enumerate(rows):
        c = values[i]
        share = ((c * ref).sum(-1) / (ref * ref).sum(-1)).mean()
        assert summary.share[pos] == pytest.approx(share, rel=1e-9, abs=1e-12)
        cov = np.cov(c.T)
        evals, evecs = np.linalg.eigh(cov)
        u = evecs[:, -1]
        assert abs(float(summary.directions[pos, 0] @ u)) == pytest.approx(1.0, abs=1e-6)  # same axis (sign free)
        assert summary.explained[pos, 0] == pytest.approx(evals[-1] / np.trace(cov), rel=1e-6)
        proj = (c - c.mean(0)) @ summary.directions[pos, 0]
        order = np.argsort(-proj, kind="stable")[:3]
        assert summary.top_ids[pos][0] == [ids[j] for j in order]
        assert np.allclose(summary.top_values[pos, 0], proj[order])
        assert summary.bottom_ids[pos][0] == [ids[j] for j in np.argsort(proj, kind="stable")[:3]]
    assert summary.component(summary.labels[0])["directions"][0]["top"][0][0] == summary.top_ids[0][0][0]


def test_summary_round_trips_and_refuses_a_changed_store(store, tmp_path):
    built = build_summary(store, k=2, n_directions=1)
    loaded = load_summary(store)
    assert loaded.labels == built.labels and np.array_equal(loaded.top_values, built.top_values)
    manifest = store / "manifest.json"
    original = manifest.read_text(encoding="utf-8")
    try:
        manifest.write_text(original.replace("{", "{\n", 1), encoding="utf-8")  # any change to the store's record
        with pytest.raises(SummaryStaleError):
            load_summary(store)
    finally:
        manifest.write_text(original, encoding="utf-8")
    assert load_summary(store).n_items == built.n_items
