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
@pytest.mark.parametrize("init", ["random", "lstsq"])
def test_checkpoint_resume_equals_uninterrupted(tmp_path: Path, init: str) -> None:
    truth = _scaled_orthogonal(17)
    c, y = _planted(truth, n=800)
    cfg = AlignConfig(parametrisation="orthogonal", lr=0.03, epochs=5, batch_size=50, patience=None, seed=4,
                      init=init)  # type: ignore[arg-type]
    straight = fit_compalign(_source(c, y), C, DM, DC, cfg)
    start = 1 if init == "lstsq" else 0  # the closed-form start reads the rows once before epoch 1

    calls = {"n": 0}

    def crashing() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        calls["n"] += 1
        for i, batch in enumerate(_source(c, y)()):
            if calls["n"] == 4 + start and i == 3:  # killed in the middle of the fourth epoch
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


# ------------------------------------------------------------------ (8) the closed-form start and the defaults
def _planted_problem(n: int, normalise: bool, seed: int = 0, comp: int = 6, d_model: int = 16,
                     d_clip: int = 24) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random components ``c [n, comp, d_model]``, random scaled-orthogonal maps ``F_i = s_i Q_i`` (``s_i`` in
    [0.5, 2]) and ``y = Σ_i F_i c_i`` (unit-normalised with ``normalise``: the cosine objective ignores the
    norm, the least-squares start does not)."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.rand(comp, generator=gen, dtype=torch.float64) * 1.5 + 0.5
    truth = s[:, None, None] * torch.linalg.qr(torch.randn(comp, d_clip, d_model, generator=gen,
                                                           dtype=torch.float64)).Q
    c = torch.randn(n, comp, d_model, generator=gen, dtype=torch.float64)
    y = torch.einsum("bcm,ckm->bk", c, truth)
    if normalise:
        y = torch.nn.functional.normalize(y, dim=-1)
    return c.float(), y.float(), truth


@pytest.mark.parametrize("normalise", [False, True])
def test_default_config_solves_a_planted_problem_of_3000_rows(normalise: bool, caplog) -> None:
    c, y, truth = _planted_problem(3000, normalise)
    comp, d_model, d_clip = truth.shape[0], truth.shape[2], truth.shape[1]
    align = fit_compalign(_source(c, y, chunk=256), comp, d_model, d_clip, AlignConfig())
    assert align.meta["val_cosine"] >= 0.99
    assert align.meta["init"]["method"] == "lstsq" and align.meta["history"][0]["epochs_trained"] == 0
    assert align.meta["converged"] and align.meta["warnings"] == []
    fresh_c = torch.randn(500, comp, d_model, generator=torch.Generator().manual_seed(9))  # rows never seen
    fresh_y = torch.einsum("bcm,ckm->bk", fresh_c.double(), truth).float()
    assert align.metrics(_source(fresh_c, fresh_y))["cosine"] >= 0.99
    # the published settings (random start, lr 3e-4, 2 epochs, batch 32) do not get there, and say so
    caplog.clear()
    with caplog.at_level("WARNING", logger="vitdecomp.interpret.align.fit"):
        published = fit_compalign(_source(c, y, chunk=256), comp, d_model, d_clip, AlignConfig.published())
    assert published.meta["val_cosine"] < 0.5 and published.meta["init"] == {"method": "random"}
    assert not published.meta["converged"]
    assert [w.split(":")[0].split(" ")[0] for w in published.meta["warnings"]] == ["not", "low"]
    assert sum("low held-out cosine" in r.getMessage() for r in caplog.records) == 1
    assert sum("not converged" in r.getMessage() for r in caplog.records) == 1
    history = [h["val_cosine"] for h in published.meta["history"]]
    assert len(history) == 3 and history[-1] == max(history)  # still rising when the epochs ran out


def test_presets_and_old_configs() -> None:
    pub = AlignConfig.published()
    assert (pub.init, pub.lr, pub.epochs, pub.batch_size) == ("random", 3e-4, 2, 32)
    assert AlignConfig.preset("published", seed=3) == AlignConfig.published(seed=3)
    assert AlignConfig.preset("default") == AlignConfig() and AlignConfig().init == "lstsq"
    with pytest.raises(InputError, match="preset"):
        AlignConfig.preset("paper")
    old = AlignConfig().to_json()
    del old["init"], old["ridge"], old["sweeps"], old["lstsq_max_columns"], old["min_delta"]
    back = AlignConfig.from_json(old)  # written before the closed-form start existed
    assert back.init == "random" and back.min_delta == 0.0
    for bad in ({"init": "zeros"}, {"ridge": -1.0}, {"sweeps": -1}, {"lstsq_max_columns": 0}, {"min_delta": -1.0}):
        with pytest.raises(InputError):
            AlignConfig(**bad)  # type: ignore[arg-type]


def _train_rows(c: torch.Tensor, y: torch.Tensor, config: AlignConfig) -> tuple[torch.Tensor, torch.Tensor]:
    train = torch.as_tensor(~validation_mask(np.arange(c.shape[0]), config.seed, config.val_fraction))
    return c[train].double(), y[train].double()


def test_closed_form_start_is_the_least_squares_solution_on_the_training_rows() -> None:
    from vitdecomp.interpret.align import closed_form_maps

    gen = torch.Generator().manual_seed(31)
    truth = torch.randn(C, DC, DM, generator=gen, dtype=torch.float64) / DC**0.5  # any linear maps
    c, y = _planted(truth, n=600)
    y = y + 0.3 * torch.randn(y.shape, generator=gen)  # noise: the held-out rows would move the solution
    cfg = AlignConfig(lam=0.0, ridge=0.0)  # the unconstrained objective starts from the plain solution
    start = closed_form_maps(_source(c, y), C, DM, DC, cfg, "isometry")
    ct, yt = _train_rows(c, y, cfg)
    w = torch.linalg.lstsq(ct.reshape(ct.shape[0], -1), yt).solution  # [C * DM, DC]
    expected = w.reshape(C, DM, DC).mT
    factor = start.info["rescaled_by"]
    assert torch.allclose(start.maps / factor, expected, atol=1e-8, rtol=0)
    assert start.info["system"] == "joint" and start.info["train_rows"] == ct.shape[0] < 600
    resid = yt - torch.einsum("bcm,ckm->bk", ct, expected)
    assert start.info["train_r2"] == pytest.approx(1 - float(resid.pow(2).sum() / yt.pow(2).sum()), abs=1e-9)
    # grouped maps: one regression on the group sums
    grouped = AlignConfig(mode="grouped", groups=[[0, 2], [1, 3]], lam=0.0, ridge=0.0)
    start = closed_form_maps(_source(c, y), C, DM, DC, grouped, "isometry")
    sums = torch.stack([ct[:, 0] + ct[:, 2], ct[:, 1] + ct[:, 3]], 1)
    w = torch.linalg.lstsq(sums.reshape(sums.shape[0], -1), yt).solution
    assert torch.allclose(start.maps / start.info["rescaled_by"], w.reshape(2, DM, DC).mT, atol=1e-8, rtol=0)
    # a system wider than lstsq_max_columns falls back to the shared map's solution, for every map
    small = AlignConfig(lam=0.0, ridge=0.0, lstsq_max_columns=C * DM - 1)
    start = closed_form_maps(_source(c, y), C, DM, DC, small, "isometry")
    w = torch.linalg.lstsq(ct.sum(1), yt).solution
    assert start.info["system"] == "shared" and start.info["columns"] == DM
    assert all(torch.allclose(start.maps[i] / start.info["rescaled_by"], w.T, atol=1e-8) for i in range(C))
    # the ridge shrinks the solution toward 0, at a cost in training fit
    ridged = closed_form_maps(_source(c, y), C, DM, DC, AlignConfig(lam=0.0, ridge=1.0), "isometry")
    assert ridged.info["train_r2"] < closed_form_maps(_source(c, y), C, DM, DC, cfg, "isometry").info["train_r2"]
    assert float((ridged.maps / ridged.info["rescaled_by"]).norm()) < float(expected.norm())


def test_orthogonal_start_recovers_planted_maps_and_sweeps_only_help() -> None:
    from vitdecomp.interpret.align import closed_form_maps

    c, y, truth = _planted_problem(3000, normalise=False)
    comp, d_model, d_clip = truth.shape[0], truth.shape[2], truth.shape[1]
    cfg = AlignConfig(parametrisation="orthogonal")
    start = closed_form_maps(_source(c, y, chunk=256), comp, d_model, d_clip, cfg, "isometry")
    assert _rel(start.maps, truth) < 1e-4
    assert torch.allclose(start.maps, start.scales[:, None, None] * start.unit, atol=1e-12)
    assert float(orthogonality_defect(start.maps)[0].max()) < 1e-8
    assert torch.allclose(start.scales, truth.norm(dim=(1, 2)) / d_model**0.5, rtol=1e-4)
    # fewer rows than least-squares columns (90 < 6 x 16): the plain solution is not unique, the constrained one
    # is; each Procrustes sweep lowers the training error, and the maps approach the planted ones
    c, y, truth = _planted_problem(100, normalise=False)
    r2, err = [], []
    for sweeps in (0, 2, 50):
        s = closed_form_maps(_source(c, y), comp, d_model, d_clip, AlignConfig(parametrisation="orthogonal",
                                                                               sweeps=sweeps), "isometry")
        assert s.info["train_rows"] < comp * d_model and s.info["train_r2"] > 0.999  # interpolates
        r2.append(s.info["train_r2_constrained"])
        err.append(_rel(s.maps, truth))
        assert float(orthogonality_defect(s.maps)[0].max()) < 1e-8
    assert r2[0] < r2[1] < r2[2] and err[0] > err[1] > err[2]
    # common scale: one s; co-isometry: orthonormal rows
    common = closed_form_maps(_source(c, y), comp, d_model, d_clip,
                              AlignConfig(parametrisation="orthogonal", common_scale=True), "isometry")
    assert torch.allclose(common.scales, common.scales[0].expand(comp))
    c, y = _planted(_orthonormal(C, DM, DC, torch.Generator().manual_seed(3)), n=600)  # 12 -> 8: co-isometries
    co = closed_form_maps(_source(c, y), C, DC, DM, AlignConfig(parametrisation="orthogonal", constraint="coisometry"),
                          "coisometry")
    assert float(orthogonality_defect(co.maps, "coisometry")[0].max()) < 1e-8
    assert co.info["train_r2_constrained"] > 0.999


def test_convergence_is_recorded() -> None:
    truth = _scaled_orthogonal(37)
    c, y = _planted(truth, n=1000)
    # a random start with a small learning rate is still improving when the epochs run out
    slow = fit_compalign(_source(c, y), C, DM, DC, AlignConfig(init="random", lr=3e-3, epochs=3, patience=None))
    cos = [h["val_cosine"] for h in slow.meta["history"]]
    assert [h["epochs_trained"] for h in slow.meta["history"]] == [0, 1, 2, 3]
    assert cos[-1] > max(cos[:-1]) + 1e-3 and not slow.meta["converged"]
    assert any(w.startswith("not converged") for w in slow.meta["warnings"])
    # early stopping, or a last epoch that no longer improves, is convergence
    done = fit_compalign(_source(c, y), C, DM, DC, AlignConfig(parametrisation="orthogonal", epochs=4, patience=1))
    assert done.meta["converged"] and done.meta["warnings"] == [] and done.meta["val_cosine"] > 0.999
