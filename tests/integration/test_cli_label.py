"""`vitdecomp label STORE`: TextSpan over every head of a stored decomposition of the shipped tiny CLIP."""
from __future__ import annotations

import json

import numpy as np
import pytest

from vitdecomp.cli.main import main
from vitdecomp.core.shipped import shipped_path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from vitdecomp.synth import generate_dataset

    root = tmp_path_factory.mktemp("label")
    generate_dataset(root / "data", 48, seed=1)
    spec = f"open_clip:local-dir:{shipped_path('clip')}"
    out = root / "clip.zarr"
    assert main(["decompose", spec, str(root / "data" / "train"), "--out", str(out), "--batch-size", "16",
                 "--store-dtype", "float32"]) == 0
    return spec, out


def test_label_matches_textspan_on_the_stored_rows(store, tmp_path, capsys):
    import torch

    import vitdecomp as vd
    from vitdecomp.store.component_store import ComponentStore, RunningMoments
    from vitdecomp.interpret.text import text_encoder
    from vitdecomp.interpret.text.pools import load_pool
    from vitdecomp.interpret.textspan import textspan_heads

    spec, path = store
    target = tmp_path / "labels.json"
    assert main(["label", str(path), "--pool", "feature/colour", "--m", "2", "--out", str(target)]) == 0
    assert "L03.H" in capsys.readouterr().out
    payload = json.loads(target.read_text(encoding="utf-8"))
    heads = payload["heads"]
    assert len(heads) == 16 and all(len(h["texts"]) == 2 for h in heads)
    # the same numbers from the stored rows directly (streamed chunk by chunk, as the command does)
    st = ComponentStore.open(path)
    moments = RunningMoments(len(st.labels), st.comp_shape[-1], covariance=True)
    for stack in st.iter_batches():
        moments.update(stack.values.movedim(0, 1))
    pool = load_pool("feature/colour")
    emb = text_encoder(vd.load(spec)).encode(pool.texts).double().numpy()
    direct = textspan_heads(moments, list(st.labels), pool.texts, emb,
                            components=[i for i, n in enumerate(st.labels) if ".H" in n], m=2)
    assert [h["texts"] for h in heads] == [r.texts for r in direct]
    np.testing.assert_allclose([h["variance_explained"] for h in heads], [r.variance_explained for r in direct],
                               rtol=1e-9, atol=1e-12)
    assert payload["pool"]["sha256"] == pool.sha256 and torch.isfinite(stack.values).all()


def test_label_dedupe_last_layers_and_mismatched_model(store, capsys):
    spec, path = store
    assert main(["label", str(path), "--pool", "feature/colour", "--m", "1", "--dedupe", "--layers", "1",
                 "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    texts = [h["texts"][0] for h in payload["heads"]]
    assert len(texts) == 4 and len(set(texts)) == 4
    code = main(["label", str(path), "--model", "timm:vit_tiny_patch16_224", "--pool", "feature/colour"])
    assert code != 0


def test_label_reports_the_random_pool_control(store, tmp_path):
    import numpy as np

    from vitdecomp.interpret.textspan import label_store
    from vitdecomp.interpret.text.pools import load_pool

    spec, path = store
    result = label_store(path, "feature/colour", m=2, layers=1)
    payload = result.to_json()
    control = payload["random_pool_control"]["heads"]
    assert set(control) == {h["label"] for h in payload["heads"]}
    pool = load_pool("feature/colour")
    for curve in control.values():
        assert len(curve) == 2 and 0.0 <= curve[0] <= curve[1] <= 1.0 + 1e-9  # cumulative, a fraction
    again = label_store(path, "feature/colour", m=2, layers=1)  # seeded: the same control
    assert again.to_json()["random_pool_control"]["heads"] == control
    assert str(len(pool.texts)) in payload["random_pool_control"]["what"]
    assert "random" in result.format().splitlines()[0]
    assert np.isfinite([v for c in control.values() for v in c]).all()
