"""vitdecomp.interpret.align (CompAlign) on planted synthetic data (no models)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from vitdecomp import ComponentLabel, ComponentStack, InputError
from vitdecomp.interpret.align import (
    AlignConfig,
    AlignmentInfeasibleError,
    CompAlign,
    fit_compalign,
    orthogonality_defect,
    store_batches,
    validation_mask,
)

C, DM, DC, N = 4, 8, 12, 2000  # components, d_model, d_clip, rows
LABELS = tuple(ComponentLabel("head", 0, head=h) for h in range(C))
NAMES = [str(lab) for lab in LABELS]

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def _orthonormal(n: int, rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """``[n, rows, cols]`` with orthonormal columns (rows >= cols) or rows (rows < cols)."""
    if rows >= cols:
        return torch.linalg.qr(torch.randn(n, rows, cols, generator=gen, dtype=torch.float64)).Q
    return torch.linalg.qr(torch.randn(n, cols, rows, generator=gen, dtype=torch.float64)).Q.mT


def _planted(maps: torch.Tensor, seed: int = 1, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    """Random components ``c [n, comp, d_model]`` and targets ``y = Σ_i F_i c_i [n, d_clip]``."""
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(n, maps.shape[0], maps.shape[2], generator=gen, dtype=torch.float64)
    y = torch.einsum("bcm,ckm->bk", c, maps)
    return c.float(), y.float()


def _source(c: torch.Tensor, y: torch.Tensor, chunk: int = 100):  # noqa: ANN202
    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, c.shape[0], chunk):
            yield c[i : i + chunk], y[i : i + chunk]

    return batches


def _scaled_orthogonal(seed: int, d_model: int = DM, d_clip: int = DC) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    s = torch.rand(C, generator=gen, dtype=torch.float64) * 1.5 + 0.5
    return s[:, None, None] * _orthonormal(C, d_clip, d_model, gen)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


FAST = {"lr": 0.05, "epochs": 15, "batch_size": 64, "patience": None}


@pytest.fixture(scope="module")
def planted_fit() -> tuple[CompAlign, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    truth = _scaled_orthogonal(0)
    c, y = _planted(truth)
    align = fit_compalign(_source(c, y), C, DM, DC, AlignConfig(parametrisation="orthogonal", **FAST), labels=NAMES)
    return align, truth, (c, y)


# ------------------------------------------------------------------ (1) planted recovery
def test_orthogonal_recovers_planted_maps(planted_fit) -> None:  # noqa: ANN001
    align, truth, (c, y) = planted_fit
    assert align.maps.shape == (C, DC, DM)
    assert _rel(align.maps, truth) < 0.05
    defect, scale = align.defects()
    assert float(defect.max()) < 1e-5  # hard constraint
    assert torch.allclose(scale, truth.norm(dim=(1, 2)) / DM**0.5, rtol=0.05)
    held_out = _planted(truth, seed=2, n=500)
    m = align.metrics(_source(*held_out))
    assert m["cosine"] > 0.99 and m["n"] == 500
    assert m["lsq_scale"] == pytest.approx(1.0, abs=0.05)  # calibrated global scale
    assert np.allclose(m["energy_retained"], 1.0, atol=1e-4)
    val = align.metrics(_source(c, y), split="val")
    assert val["cosine"] > 0.99 and 0 < val["n"] < N
    assert val["n"] == int(validation_mask(np.arange(N), 0, 0.1).sum())
    assert align.meta["val_cosine"] > 0.99


def test_validation_split_is_a_stable_hash() -> None:
    rows = np.arange(10_000)
    mask = validation_mask(rows, 3, 0.2)
    assert 0.18 < mask.mean() < 0.22
    assert np.array_equal(mask[::-1], validation_mask(rows[::-1], 3, 0.2))  # order-free
    assert not np.array_equal(mask, validation_mask(rows, 4, 0.2))  # seed matters


# ------------------------------------------------------------------ (2) the penalty
def test_penalty_reduces_orthogonality_defect() -> None:
    gen = torch.Generator().manual_seed(5)
    truth = torch.randn(C, DC, DM, generator=gen, dtype=torch.float64) / DC**0.5  # not orthogonal
    c, y = _planted(truth, n=1000)
    cfg = {"parametrisation": "penalty", "lr": 0.02, "epochs": 15, "batch_size": 64, "patience": None}
    free = fit_compalign(_source(c, y), C, DM, DC, AlignConfig(lam=0.0, **cfg))
    reg = fit_compalign(_source(c, y), C, DM, DC, AlignConfig(lam=0.05, **cfg))
    d_free, d_reg = float(free.defects()[0].mean()), float(reg.defects()[0].mean())
    d_truth = float(orthogonality_defect(truth)[0].mean())
    assert d_free > 0.5 * d_truth  # the unconstrained fit moves toward the planted non-orthogonal maps
    assert d_reg < 0.5 * d_free
    assert free.meta["val_cosine"] > reg.meta["val_cosine"]  # the constraint costs fit
    assert free.meta["scale_calibration"] == 1.0  # penalty maps are not rescaled


# ------------------------------------------------------------------ (3) shared map
def test_shared_map_fits_exactly() -> None:
    gen = torch.Generator().manual_seed(7)
    truth = 1.7 * _orthonormal(1, DC, DM, gen)  # one map for every component
    c, y = _planted(truth.expand(C, DC, DM), n=1000)
    align = fit_compalign(_source(c, y), C, DM, DC, AlignConfig(mode="shared", parametrisation="orthogonal", **FAST))
    assert align.n_maps == 1 and align.map_index == (0,) * C
    maps = align.maps
    assert all(torch.equal(maps[0], maps[i]) for i in range(C))
    assert _rel(maps[0], truth[0]) < 1e-3
    assert align.meta["val_cosine"] > 1 - 1e-6


def test_common_scale_shares_one_scale() -> None:
    truth = 1.3 * _orthonormal(C, DC, DM, torch.Generator().manual_seed(29))
    c, y = _planted(truth, n=1000)
    align = fit_compalign(_source(c, y), C, DM, DC,
                          AlignConfig(parametrisation="orthogonal", common_scale=True, **FAST))
    scale = align.defects()[1]
    assert torch.allclose(scale, scale[0].expand(C), rtol=1e-6)
    assert _rel(align.maps, truth) < 0.05


def test_grouped_maps_and_group_validation() -> None:
    truth = _scaled_orthogonal(11)
    truth[1] = truth[0]
    truth[3] = truth[2]
    c, y = _planted(truth, n=1000)
    cfg = AlignConfig(mode="grouped", groups=[[0, 1], [2, 3]], parametrisation="orthogonal", **FAST)
    align = fit_compalign(_source(c, y), C, DM, DC, cfg)
    assert align.n_maps == 2 and align.map_index == (0, 0, 1, 1)
    assert _rel(align.maps, truth) < 0.05
    with pytest.raises(InputError, match="partition"):
        fit_compalign(_source(c, y), C, DM, DC, AlignConfig(mode="grouped", groups=[[0, 1], [1, 2]]))
    with pytest.raises(InputError):
        AlignConfig(mode="grouped")


# ------------------------------------------------------------------ (4) feasibility
def test_infeasible_isometry_raises_and_coisometry_works() -> None:
    d_model, d_clip = DC, DM  # 12 -> 8: no isometry exists
    with pytest.raises(AlignmentInfeasibleError, match="coisometry") as err:
        fit_compalign(lambda: iter(()), C, d_model, d_clip, AlignConfig(parametrisation="orthogonal"))
    assert "PCA" in str(err.value) and "penalty" in str(err.value)
    assert isinstance(err.value, InputError)
    with pytest.raises(AlignmentInfeasibleError):
        fit_compalign(lambda: iter(()), C, d_model, d_clip, AlignConfig(constraint="isometry", lam=0.1))

    truth = _orthonormal(C, d_clip, d_model, torch.Generator().manual_seed(13))  # orthonormal rows, k = 1
    c, y = _planted(truth, n=1000)
    # hard co-isometry (asked for by name) recovers the maps
    hard = fit_compalign(_source(c, y), C, d_model, d_clip,
                         AlignConfig(parametrisation="orthogonal", constraint="coisometry", **FAST))
    assert hard.constraint == "coisometry"
    assert _rel(hard.maps, truth) < 0.05 and hard.meta["val_cosine"] > 0.99
    assert float(hard.defects()[0].max()) < 1e-5
    # penalty mode picks the smaller Gram side by itself and stays near a co-isometry
    soft = fit_compalign(_source(c, y), C, d_model, d_clip,
                         AlignConfig(lam=0.05, lr=0.02, epochs=15, batch_size=64, patience=None))
    assert soft.constraint == "coisometry"
    assert soft.meta["val_cosine"] > 0.99
    assert float(soft.defects()[0].max()) < 0.1
    assert _rel(soft.maps, truth) < 0.1
    m = soft.metrics(_source(c, y), split="val")
    assert all(0.3 < r < 1.0 for r in m["energy_retained"])  # d_clip of d_model dimensions kept


# ------------------------------------------------------------------ (5) checkpoint/resume
def test_checkpoint_resume_equals_uninterrupted(tmp_path: Path) -> None:
    truth = _scaled_orthogonal(17)
    c, y = _planted(truth, n=800)
    cfg = AlignConfig(parametrisation="orthogonal", lr=0.03, epochs=5, batch_size=50, patience=None, seed=4)
    straight = fit_compalign(_source(c, y), C, DM, DC, cfg)

    calls = {"n": 0}

    def crashing() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        calls["n"] += 1
        for i, batch in enumerate(_source(c, y)()):
            if calls["n"] == 4 and i == 3:  # killed in the middle of the fourth epoch
                raise KeyboardInterrupt
            yield batch

    ckpt = tmp_path / "align.ckpt"
    with pytest.raises(KeyboardInterrupt):
        fit_compalign(crashing, C, DM, DC, cfg, checkpoint=ckpt)
    assert ckpt.is_file() and not list(tmp_path.glob(".*tmp*"))
    assert torch.load(ckpt, weights_only=True)["state"]["next_epoch"] == 3

    passes = {"n": 0}

    def counting() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        passes["n"] += 1
        return _source(c, y)()

    resumed = fit_compalign(counting, C, DM, DC, cfg, checkpoint=ckpt)
    assert passes["n"] == 3  # epochs 4 and 5, then the last evaluation
    assert torch.allclose(resumed.group_maps, straight.group_maps, atol=1e-6, rtol=0)
    assert resumed.meta["history"] == straight.meta["history"]
    # a checkpoint of another run is refused
    with pytest.raises(InputError, match="another run"):
        fit_compalign(_source(c, y), C, DM, DC, AlignConfig(parametrisation="orthogonal", seed=5), checkpoint=ckpt)


def test_early_stopping_restores_best_state() -> None:
    truth = _scaled_orthogonal(19)
    c, y = _planted(truth, n=600)
    val = torch.as_tensor(validation_mask(np.arange(600), 0, 0.1))
    y[val] = -y[val]  # validation rows disagree with training rows: fitting makes them worse
    cfg = AlignConfig(parametrisation="orthogonal", lr=0.05, epochs=30, batch_size=32, patience=2)
    align = fit_compalign(_source(c, y), C, DM, DC, cfg)
    hist = align.meta["history"]
    assert align.meta["stopped_early"]
    best = max(hist, key=lambda h: h["val_cosine"])
    assert align.meta["best_epoch"] == best["epochs_trained"]
    assert hist[-1]["epochs_trained"] - align.meta["best_epoch"] == 2 and len(hist) < 30
    assert align.meta["val_cosine"] == best["val_cosine"] > hist[-1]["val_cosine"]
    assert align.metrics(_source(c, y), split="val")["cosine"] == pytest.approx(best["val_cosine"], abs=1e-6)


# ------------------------------------------------------------------ (6) apply / identity
def _stack(c: torch.Tensor) -> ComponentStack:
    values = c.movedim(0, 1).contiguous()  # [comp, batch, d]
    return ComponentStack(values, LABELS, values.sum(0), meta={"model": "planted"})


def test_apply_maps_components_and_sums_to_reference(planted_fit) -> None:  # noqa: ANN001
    align, _, (c, y) = planted_fit
    stack = _stack(c[:16])
    out = align.apply(stack)
    assert out.space == "clip" and out.labels == stack.labels and out.values.shape == (C, 16, DC)
    assert out.error() < 1e-6
    assert torch.allclose(out.reference, align.predict(c[:16]), atol=1e-5)
    assert torch.allclose(out.values[2], c[:16, 2] @ align.maps[2].T, atol=1e-6)
    assert out.meta["alignment"]["parametrisation"] == "orthogonal" and out.meta["model"] == "planted"
    cos = torch.nn.functional.cosine_similarity(out.reference, y[:16], dim=-1)
    assert float(cos.min()) > 0.99
    # token stacks are mapped per token and still sum to the mapped reference
    tok = torch.randn(C, 3, 5, DM)
    tstack = ComponentStack(tok, LABELS, tok.sum((0, 2)))
    tout = align.apply(tstack)
    assert tout.values.shape == (C, 3, 5, DC) and tout.error() < 1e-6
    assert torch.allclose(tout.values.sum(2), align.apply(tstack.sum_tokens()).values, atol=1e-5)
    with pytest.raises(InputError):
        align.apply(ComponentStack(tok[:, :, 0, :3], LABELS, tok[:, :, 0, :3].sum(0)))
    relabelled = ComponentStack(stack.values, tuple(ComponentLabel("mlp", i) for i in range(C)), stack.reference)
    with pytest.raises(InputError, match="labels"):
        align.apply(relabelled)


def test_identity_leaves_stack_unchanged() -> None:
    values = torch.randn(C, 6, DC)
    stack = ComponentStack(values, LABELS, values.sum(0) + 1e-7)
    ident = CompAlign.identity(C, DC)
    out = ident.apply(stack)
    assert torch.equal(out.values, stack.values) and torch.equal(out.reference, stack.reference)
    assert out.space == "clip" and out.meta["alignment"]["identity"]
    assert torch.equal(ident.maps, torch.eye(DC).expand(C, DC, DC))
    assert float(ident.defects()[0].max()) == 0.0


# ------------------------------------------------------------------ (7) files
def test_save_load_round_trip(planted_fit, tmp_path: Path) -> None:  # noqa: ANN001
    align, _, (c, _) = planted_fit
    path = align.save(tmp_path / "align.safetensors")
    back = CompAlign.load(path)
    assert torch.equal(back.group_maps, align.group_maps)
    assert back.map_index == align.map_index and back.config == align.config
    assert back.constraint == align.constraint and back.labels == align.labels
    assert back.meta["val_cosine"] == align.meta["val_cosine"]
    assert torch.equal(back.apply(_stack(c[:4])).values, align.apply(_stack(c[:4])).values)
    grouped = CompAlign.identity(C, DM)
    assert CompAlign.load(grouped.save(tmp_path / "id.safetensors")).is_identity
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(InputError):
        CompAlign.load(tmp_path / "bad.safetensors")
    with pytest.raises(InputError):
        CompAlign.load(tmp_path / "missing.safetensors")


def test_config_validation_and_json() -> None:
    cfg = AlignConfig(mode="grouped", groups=[[0], [1, 2]], lam=0.1)
    assert cfg.groups == ((0,), (1, 2))
    assert AlignConfig.from_json(cfg.to_json()) == cfg
    for bad in ({"mode": "each"}, {"val_fraction": 0.0}, {"lam": -1.0}, {"groups": [[0]]}, {"patience": 0}):
        with pytest.raises(InputError):
            AlignConfig(**bad)  # type: ignore[arg-type]


def test_bad_batches_raise() -> None:
    c, y = torch.randn(10, C, DM), torch.randn(10, DC)
    with pytest.raises(InputError, match="values must be"):
        fit_compalign(lambda: iter([(c[:, :2], y)]), C, DM, DC)
    with pytest.raises(InputError, match="sum_tokens"):
        fit_compalign(lambda: iter([(c[:, :, None], y)]), C, DM, DC)
    with pytest.raises(InputError, match="clip_targets"):
        fit_compalign(lambda: iter([(c, y[:5])]), C, DM, DC)


# ------------------------------------------------------------------ store source
def test_store_batches_feed_fit(tmp_path: Path) -> None:
    pytest.importorskip("zarr")
    from vitdecomp.store.component_store import ComponentStore, StoreConfig

    truth = _scaled_orthogonal(23)
    c, y = _planted(truth, n=400)
    cfg = StoreConfig(model="planted", weights="none", dtype="float32", n_items=400, batch_size=100,
                      package_version="0.1.0")
    store = ComponentStore.create_or_open(tmp_path / "s.zarr", cfg, NAMES, (C, DM), DM)
    for i in range(4):
        part = c[i * 100 : (i + 1) * 100]
        stack = _stack(part)
        store.write_chunk(i, stack, [f"img{r:03d}" for r in range(i * 100, (i + 1) * 100)], {})
    source = store_batches(store, y, batch_size=64)
    values, targets, rows = next(iter(source()))
    assert values.shape == (64, C, DM) and torch.equal(targets, y[:64]) and torch.equal(rows, torch.arange(64))
    align = fit_compalign(source, C, DM, DC, AlignConfig(parametrisation="orthogonal", **FAST), labels=store.labels)
    assert align.meta["val_cosine"] > 0.99
    with pytest.raises(InputError):
        store_batches(store, y[:10])


def test_alignment_config_groups_partition_the_components() -> None:
    from vitdecomp.interpret.align import alignment_config

    labels = ["embed", "L00.H00", "L00.H01", "L00.mlp", "L01.H00", "L01.mlp", "bias"]
    config, names = alignment_config(labels, maps="grouped", group_by="layer", settings={"epochs": 3})
    assert names == ["embed", "L00", "L01", "bias"] and config.epochs == 3 and config.mode == "grouped"
    assert sorted(i for g in config.groups for i in g) == list(range(len(labels)))  # a partition
    assert [labels[i] for i in config.groups[1]] == ["L00.H00", "L00.H01", "L00.mlp"]
    config, names = alignment_config(labels, maps="grouped", group_by="kind")
    assert dict(zip(names, config.groups))["head"] == (1, 2, 4)
    assert alignment_config(labels, maps="shared")[1] == ["shared"]
    assert alignment_config(labels)[1] == labels and alignment_config(labels)[0].mode == "per_component"
    with pytest.raises(InputError, match="map sharing"):
        alignment_config(labels, settings={"mode": "shared"})
