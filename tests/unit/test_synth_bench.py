"""Ground-truth benchmark pieces on planted data, the tiny models' position init and float16 storage,
and the shipped-weights loader."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from vitdecomp.errors import InputError  # noqa: E402
from vitdecomp.core.labels import ComponentLabel  # noqa: E402
from vitdecomp.interpret.score import ScoreTable  # noqa: E402
from vitdecomp.core.stack import ComponentStack  # noqa: E402
from vitdecomp.synth import bench  # noqa: E402
from vitdecomp.synth.generator import SCENE_FACTORS, VOCABULARY  # noqa: E402

# ----------------------------------------------------------------------------- planted data
D, N = 16, 240
LABELS = (ComponentLabel("embed"), ComponentLabel("head", 0, head=0), ComponentLabel("head", 0, head=1),
          ComponentLabel("head", 0, head=2), ComponentLabel("head", 1, head=0), ComponentLabel("head", 1, head=1),
          ComponentLabel("mlp", 1), ComponentLabel("const"))
COLOUR_ROW, SHAPE_ROW, BIAS_ROW = 2, 4, 7  # L00.H01 carries colour, L01.H00 shape, the last row is "bias"


@pytest.fixture(scope="module")
def planted():
    """values [comp, n, d]: one component per factor = 3 x its value's text vector + noise, others noise."""
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(D, D)))[0].T  # orthonormal rows: unit "text" vectors
    texts = {"colour": basis[:4], "shape": basis[4:7]}
    truth = {"colour": rng.integers(0, 4, N), "shape": rng.integers(0, 3, N)}
    values = 0.5 * rng.normal(size=(len(LABELS), N, D))
    values[COLOUR_ROW] = 3.0 * texts["colour"][truth["colour"]] + 0.1 * rng.normal(size=(N, D))
    values[SHAPE_ROW] = 3.0 * texts["shape"][truth["shape"]] + 0.1 * rng.normal(size=(N, D))
    values[BIAS_ROW] = 4.0 * texts["colour"][0]  # constant readout term, the same for every image
    v = torch.from_numpy(values)
    stack = ComponentStack(v, LABELS, reference=v.sum(0))
    return values, bench.component_scores(stack, texts), texts, truth


def test_component_scores_rank_the_planted_components(planted):
    _, table, _, _ = planted
    assert table.labels == tuple(str(lab) for lab in LABELS) and set(table.features) == {"colour", "shape"}
    assert int(np.argmax(table["colour"])) == COLOUR_ROW and int(np.argmax(table["shape"])) == SHAPE_ROW
    assert table["colour"][BIAS_ROW] == 0.0  # constant: no variance, no correlation


def test_factor_agreement_top_component_carries_its_factor(planted):
    values, table, texts, truth = planted
    out = bench.factor_agreement(values, table, texts, truth, k=1, n_random=10, seed=0)
    assert set(out) == {"colour", "shape"}
    colour, shape = out["colour"], out["shape"]
    assert colour["components"] == [str(LABELS[COLOUR_ROW])] and shape["components"] == [str(LABELS[SHAPE_ROW])]
    assert colour["top_k"] >= 0.9 and shape["top_k"] >= 0.9
    for a in (colour, shape):
        assert a["random_k"]["mean"] < a["top_k"] - 0.2
        assert a["other_top_k"] < a["top_k"] - 0.2  # the other factor's component does not read this one
    assert colour["chance"] == 0.25 and shape["chance"] == pytest.approx(1 / 3)


def test_retrieval_with_the_planted_component_beats_the_full_representation(planted):
    values, table, texts_of, truth = planted
    out = bench.retrieval_precision(values, table, truth, k=1, at=10, n_queries=100, n_random=5, seed=0)
    for f, row in (("colour", COLOUR_ROW), ("shape", SHAPE_ROW)):
        r = out[f]
        assert r["components"] == [str(LABELS[row])]
        assert r["top_k"] >= 0.9 and r["top_k"] > r["full"] and r["top_k"] > r["random_k"]["mean"]
        assert r["base_rate"] == pytest.approx(1 / len(texts_of[f]), abs=0.08)


def test_precision_never_retrieves_the_query_itself():
    # all features identical and every label distinct: any hit could only be the query itself
    features, labels = np.ones((6, 4)), np.arange(6)
    for at in (1, 3, 5):
        assert bench._precision(features, labels, np.arange(6), at) == 0.0
    # and a true neighbour is found
    assert bench._precision(features, np.zeros(6, dtype=int), np.arange(6), 5) == 1.0


def test_precision_excludes_the_query_even_when_at_covers_the_whole_set():
    assert bench._precision(np.ones((4, 3)), np.arange(4), np.arange(4), 10) == 0.0


def test_bias_row_is_never_selected_even_with_the_highest_score(planted):
    values, real, texts, truth = planted
    scores = np.array(real.scores)
    scores[BIAS_ROW] = 10.0  # the best score on every factor, and the most selective
    scores[BIAS_ROW, 0] = 20.0
    table = ScoreTable(scores, real.labels, real.features)
    assert bench._top(table, "colour", 1) == [COLOUR_ROW]
    assert BIAS_ROW not in bench._top(table, "colour", len(LABELS) - 1, by="selectivity")
    agreement = bench.factor_agreement(values, table, texts, truth, k=2, n_random=5, seed=0)
    retrieval = bench.retrieval_precision(values, table, truth, k=2, n_queries=20, n_random=5, seed=0)
    for out in (agreement, retrieval):
        assert all("bias" not in r["components"] for r in out.values())
    allowed = bench._scorable(table)
    from vitdecomp.core.labels import kind_mask

    assert allowed.tolist() == kind_mask(LABELS, "input").tolist()  # computing components only
    assert not allowed[BIAS_ROW] and not allowed[0]  # row 0 is embed
    # random control sets draw only allowed rows: with k = all of them, every draw is exactly that set
    draws = bench._random_sets(len(LABELS), allowed, int(allowed.sum()), 20, seed=1)
    assert len(draws) == 20 and all(d == np.flatnonzero(allowed).tolist() for d in draws)


# ----------------------------------------------------------------------------- scenes and texts
def test_make_sample_is_deterministic_per_stream_and_factor_values_index_the_vocabulary():
    a, b, c = bench.make_sample(4, 1), bench.make_sample(4, 1), bench.make_sample(4, 1, stream=8)
    assert a.images.shape == (4, 64, 64, 3) and a.images.dtype == np.uint8
    assert a.masks.shape == (4, 64, 64) and a.masks.dtype == bool and a.masks.any(axis=(1, 2)).all()
    assert np.array_equal(a.images, b.images) and not np.array_equal(a.images, c.images)
    for f in SCENE_FACTORS:
        idx = bench.factor_values(a.scenes, f)
        want = [s.background if f == "background" else getattr(s.main, f) for s in a.scenes]
        assert [VOCABULARY[f][i] for i in idx] == want


def test_factor_texts_encode_one_phrase_per_value():
    seen: list[list[str]] = []

    class Encoder:
        def encode(self, texts):
            seen.append(list(texts))
            return torch.nn.functional.normalize(torch.randn(len(texts), 8), dim=-1)

    texts = bench.factor_texts(Encoder())
    assert list(texts) == list(SCENE_FACTORS)
    for f, phrases in zip(SCENE_FACTORS, seen):
        assert texts[f].shape == (len(VOCABULARY[f]), 8) and texts[f].dtype == np.float64
        assert len(set(phrases)) == len(phrases)


# ----------------------------------------------------------------------------- spurious cue: linear head on the CLIP
N_SPUR = 64  # scenes per split (train, val, test): 16 per group in val and test


@pytest.fixture(scope="module")
def shipped_clip():
    pytest.importorskip("open_clip")
    pytest.importorskip("safetensors")
    pytest.importorskip("sklearn")
    from vitdecomp.core.shipped import load_shipped

    return load_shipped("clip")


def _capture_splits(monkeypatch, swap=None):
    """Record the splits spurious_bench makes ({stream: StackSplit}); ``swap`` maps a stream to a replacement."""
    captured = {}
    original = bench._labelled_split

    def recording(model, n, seed, stream, labeller, batch_size):
        captured[stream] = original(model, n, seed, (swap or {}).get(stream, stream), labeller, batch_size)
        return captured[stream]

    monkeypatch.setattr(bench, "_labelled_split", recording)
    return captured


@pytest.fixture(scope="module")
def clip_spurious(shipped_clip):
    mp = pytest.MonkeyPatch()
    captured = _capture_splits(mp)
    out = bench.spurious_bench(shipped_clip, n_train=N_SPUR, n=N_SPUR, k=3, n_random=10)
    mp.undo()
    return out, captured


def _groups(split):
    return np.bincount(2 * split.y + split.place, minlength=4).tolist()


def test_aligned_labeller_plans_the_biased_split():
    from vitdecomp.synth.dataset import PLACES, SPURIOUS_GROUPS

    groups = SPURIOUS_GROUPS["pattern"]
    for n, aligned, want in ((40, 0.95, 38), (6, 0.5, 4), (10, 1.0, 10), (10, 0.0, 0)):
        # per class n_y items, round(aligned * n_y) half up with place = y: 40 -> 2 x 19; 6 -> 2 x round(1.5) = 2 x 2
        sample = bench.make_sample(n, 3, 10, bench.aligned_labeller("pattern", groups, aligned, n))
        y = np.array(sample.labels)
        place = np.array([PLACES.index(s.background) for s in sample.scenes])
        assert int((y == place).sum()) == want and np.bincount(y, minlength=2).tolist() == [n - n // 2, n // 2]
        assert all(s.main.pattern in groups[label] for s, label in zip(sample.scenes, sample.labels))
    with pytest.raises(InputError, match="aligned share"):
        bench.aligned_labeller("pattern", groups, 1.5, 10)


def test_spurious_splits_are_biased_train_and_balanced_val_test(clip_spurious):
    out, splits = clip_spurious
    assert sorted(splits) == sorted(bench.SPURIOUS_STREAMS.values())
    train, val, test = (splits[bench.SPURIOUS_STREAMS[s]] for s in ("train", "val", "test"))
    assert int((train.y == train.place).sum()) == 2 * 30  # round(0.95 * 32) per class
    assert out["train_aligned_share"] == pytest.approx(60 / N_SPUR)
    assert _groups(val) == _groups(test) == [N_SPUR // 4] * 4
    assert out["before"]["counts"] == {str(g): N_SPUR // 4 for g in range(4)}
    assert out["n"] == {"train": N_SPUR, "val": N_SPUR, "test": N_SPUR} and out["head"]["kind"] == "linear"
    assert out["task"] == "pattern" and out["groups"] == [["solid", "dotted"], ["striped", "checkered"]]
    assert out["selection_split"] == "val" and out["reference_split"] == "val" and out["evaluation_split"] == "test"
    assert "| top-3 contrastive ablated |" in out["table"]


def test_spurious_selection_is_the_top_contrastive_candidates_recomputed(shipped_clip, clip_spurious):
    """Full (unprojected) moments of the val stack, the texts embedded again: the same top-3 candidates;
    the variance control is the top-3 by val total variance computed directly."""
    from vitdecomp.apps.debias import candidate_mask, embed_texts
    from vitdecomp.interpret.score import ScoreMoments, feature_basis, score_table
    from vitdecomp.interpret.text import text_encoder

    out, splits = clip_spurious
    val = splits[bench.SPURIOUS_STREAMS["val"]].stack
    enc = text_encoder(shipped_clip)
    texts = out["texts"]
    table = score_table(ScoreMoments.from_stack(val), {
        "s": feature_basis(embed_texts(enc, texts["spurious"], texts["templates"])),
        "c": feature_basis(embed_texts(enc, texts["core"], texts["templates"]))})
    names = val.names
    allowed = candidate_mask(names)
    assert allowed.sum() < len(names)  # constant rows exist and are excluded
    contrast = np.where(allowed, table.contrastive("s", "c"), -np.inf)
    assert out["selected"] == [names[i] for i in np.argsort(-contrast, kind="stable")[:3]]
    variance = np.where(allowed, val.values.double().numpy().var(axis=1, ddof=1).sum(-1), -np.inf)
    assert out["variance_control"]["components"] == [names[i] for i in np.argsort(-variance, kind="stable")[:3]]
    assert set(out["selected"]) != set(out["variance_control"]["components"])


def test_spurious_figures_equal_sklearn_and_ablate_by_hand(clip_spurious):
    """Logistic regression fitted by hand on train, predictions on the test representation with the
    components replaced by their val means (vitdecomp.interpret.ablate), groups counted by hand."""
    from sklearn.linear_model import LogisticRegression

    from vitdecomp.interpret.ablate import ablate

    out, splits = clip_spurious
    train, val, test = (splits[bench.SPURIOUS_STREAMS[s]] for s in ("train", "val", "test"))
    x = train.stack.values.double().sum(0).numpy()
    mean, sd = x.mean(0), np.where(x.std(0) > 1e-12, x.std(0), 1.0)
    model = LogisticRegression(C=1.0, max_iter=2000, random_state=0).fit((x - mean) / sd, train.y)
    cases = [([], out["before"]), (out["selected"], out["after"]),
             (out["variance_control"]["components"], out["variance_control"])]
    cases += [(d["components"], d) for d in out["random"]["draws"][:3]]
    for components, got in cases:
        z = ablate(test.stack, components, mode="mean", reference=val.stack).numpy()
        pred = model.predict((z - mean) / sd)
        per = {str(g): float(np.mean(pred[2 * test.y + test.place == g] == g // 2)) for g in range(4)}
        assert got["groups"] == pytest.approx(per)
        assert got["worst_group"] == pytest.approx(min(per.values()))
        assert got["average_group"] == pytest.approx(np.mean(list(per.values())))
        assert got["weighted"] == pytest.approx(np.mean(pred == test.y))
    wga = [d["worst_group"] for d in out["random"]["draws"]]
    assert len(wga) == 10 and out["random"]["worst_group_mean"] == pytest.approx(np.mean(wga))
    assert out["random"]["worst_group_sd"] == pytest.approx(np.std(wga))
    assert out["random"]["worst_group_max"] == max(wga)


def test_ablating_the_selected_components_raises_wga_more_than_random(clip_spurious):
    """The method works on this world: the linear head leans on the background (baseline WGA < 1), and
    mean-ablating the 3 val-selected components raises the test WGA above the baseline and above the
    mean of 10 random draws, and the average-group accuracy to at least the random mean. Checked over
    data seeds 0-9 at this size (64 per split): WGA rises in 10/10 and beats the random mean in 10/10
    (smallest margin 0.750 vs 0.731). At 96 per split one seed in ten has the random mean ahead (0.917
    vs 0.933), so this is a property of the fixed seed and size, not a bound."""
    out, _ = clip_spurious
    before, after, rand = out["before"], out["after"], out["random"]
    assert before["worst_group"] < 1.0
    assert after["worst_group"] > before["worst_group"]
    assert after["worst_group"] > rand["worst_group_mean"]
    assert after["average_group"] >= rand["average_group_mean"]


def test_spurious_selection_reads_val_only_not_train_or_test(shipped_clip, monkeypatch):
    def run(swap=None):
        captured = _capture_splits(monkeypatch, swap)
        out = bench.spurious_bench(shipped_clip, n_train=16, n=16, k=3, n_random=2, seed=5)
        monkeypatch.undo()
        return out, captured

    base, splits = run()
    new_test, test_splits = run({12: 99})
    assert new_test["selected"] == base["selected"] and new_test["scores"] == base["scores"]
    assert not torch.equal(test_splits[12].stack.values, splits[12].stack.values)  # the test data did change
    new_train, _ = run({10: 97})
    assert new_train["selected"] == base["selected"] and new_train["scores"] == base["scores"]
    new_val, _ = run({11: 98})
    assert new_val["scores"] != base["scores"]  # selection does read val


def test_in_memory_debias_input_errors(clip_spurious):
    from vitdecomp.apps import debias as db

    _, splits = clip_spurious
    val, test = splits[bench.SPURIOUS_STREAMS["val"]], splits[bench.SPURIOUS_STREAMS["test"]]
    with pytest.raises(InputError, match="length"):
        db.StackSplit(val.stack, val.y[:-1], val.place)
    with pytest.raises(InputError, match="0 or 1"):
        db.StackSplit(val.stack, val.y + 1, val.place)
    head = db.fit_linear_head_stack(splits[bench.SPURIOUS_STREAMS["train"]])
    texts = np.eye(val.stack.dim)[:2]
    fewer = db.StackSplit(test.stack.take(test.stack.names[:-1]), test.y, test.place)
    with pytest.raises(InputError, match="different components"):
        db.debias_stacks(val, fewer, head, spurious=texts, core=texts, k=3)
    with pytest.raises(InputError, match="wide"):
        db.debias_stacks(val, test, head, spurious=np.eye(3)[:2], core=np.eye(3)[:2], k=3)
    with pytest.raises(InputError, match="k must be"):
        db.debias_stacks(val, test, head, spurious=texts, core=texts, k=0)


def test_spurious_bench_input_errors(shipped_clip):
    with pytest.raises(InputError, match="at least 8"):
        bench.spurious_bench(shipped_clip, n_train=4, n=16)
    with pytest.raises(InputError, match="unknown factor"):
        bench.spurious_bench(shipped_clip, task="smell", n_train=16, n=16)
    with pytest.raises(InputError, match="overlap"):
        bench.spurious_bench(shipped_clip, groups=[["solid"], ["solid", "dotted"]], n_train=16, n=16)


# ----------------------------------------------------------------------------- spurious cue: the tiny classifier
@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    pytest.importorskip("timm")
    pytest.importorskip("safetensors")
    from vitdecomp.synth.train import train_classifier
    from vitdecomp.core.shipped import load_shipped

    root = tmp_path_factory.mktemp("weights")
    train_classifier(steps=2, batch_size=8, eval_n=0, spurious=0.95, task="shape", out_path=root / "spurious")
    return load_shipped("spurious", root)


def test_spurious_bench_adds_the_classifier_row(shipped_clip, classifier):
    out = bench.spurious_bench(shipped_clip, classifier, n_train=16, n=16, n_classifier=12, k=2, n_random=2)
    row = out["classifier"]
    assert row["note"] == bench.CLASSIFIER_NOTE and row["model"] == classifier.name != out["model"]
    assert row["n_val"] == 12 and len(row["selected"]) == 2 and row["selection_split"] == "val"
    assert len(out["selected"]) == 2 and out["n"]["val"] == 16


def _run_spurious(model, monkeypatch, *, swap=None, n_random=4):
    """classifier_spurious_bench with small sizes; records make_sample calls; ``swap`` maps stream -> replacement."""
    calls: list[tuple[int, int, int]] = []
    original = bench.make_sample

    def recording(n, seed, stream=7, labeller=None):
        assert labeller is not None
        calls.append((n, seed, stream))
        return original(n, seed, (swap or {}).get(stream, stream), labeller)

    monkeypatch.setattr(bench, "make_sample", recording)
    info = model.extras["tiny"]
    out = bench.classifier_spurious_bench(model, task=info["task"], groups=info["groups"], n=16, k=2,
                                          n_random=n_random, seed=5, batch_size=16)
    monkeypatch.undo()
    return out, calls


def test_classifier_spurious_bench_structure_and_random_draws(classifier, monkeypatch):
    from vitdecomp.synth import train

    evaluated = []
    original = train.group_accuracy
    monkeypatch.setattr(train, "group_accuracy", lambda *a: evaluated.append(1) or original(*a))
    n_random = 3
    info = classifier.extras["tiny"]
    out = bench.classifier_spurious_bench(classifier, task=info["task"], groups=info["groups"], n=16, k=2,
                                          n_random=n_random, seed=5, batch_size=16)
    assert len(evaluated) == 2 + n_random  # before, after, one per random draw
    assert out["k"] == 2 and len(out["selected"]) == 2 and set(out["selection_scores"]) == set(out["selected"])
    assert out["selection_split"] == "val" and out["evaluation_split"] == "test" and out["n_val"] == 16
    for key in ("before", "after"):
        acc = out[key]
        assert set(acc["groups"]) <= {"0", "1", "2", "3"}
        assert acc["worst_group"] == min(acc["groups"].values()) <= acc["average_group"]
    r = out["random"]
    assert r["worst_group_mean"] <= r["worst_group_max"] and r["worst_group_sd"] >= 0.0


def test_classifier_spurious_selection_uses_val_only(classifier, monkeypatch):
    base, calls = _run_spurious(classifier, monkeypatch)
    assert sorted(stream for _, _, stream in calls) == [11, 12] and all(n == 16 and s == 5 for n, s, _ in calls)
    other_test, _ = _run_spurious(classifier, monkeypatch, swap={12: 99})
    assert other_test["selected"] == base["selected"] and other_test["selection_scores"] == base["selection_scores"]
    other_val, _ = _run_spurious(classifier, monkeypatch, swap={11: 98})
    assert other_val["selection_scores"] != base["selection_scores"]  # selection does read val


def test_classifier_spurious_never_selects_the_bias_row(classifier, monkeypatch):
    # give every constant logit share (the readout "bias" row) the top place-correlation
    original, calls, constant = bench._abs_corr, [], []

    def rigged(a, b):
        calls.append(1)
        if len(calls) % 2 == 1 and np.ptp(a) == 0:  # first call per component is the place term
            constant.append(1)
            return 10.0
        return original(a, b)

    monkeypatch.setattr(bench, "_abs_corr", rigged)
    info = classifier.extras["tiny"]
    out = bench.classifier_spurious_bench(classifier, task=info["task"], groups=info["groups"], n=16, k=2,
                                          n_random=2, seed=5, batch_size=16)
    assert constant, "no constant component seen: the test would be vacuous"
    assert "bias" not in out["selected"]


def test_classifier_spurious_bench_needs_a_classifier_head():
    pytest.importorskip("open_clip")
    import vitdecomp as vd
    from vitdecomp.core.tiny import build_tiny_clip

    with pytest.raises(InputError, match="classifier"):
        bench.classifier_spurious_bench(vd.wrap(build_tiny_clip(0).eval()), task="shape",
                                        groups=[["circle"], ["square"]], n=4)


# ----------------------------------------------------------------------------- shipped weights
def test_load_shipped_errors(tmp_path):
    from vitdecomp.core.shipped import load_shipped, shipped_path

    with pytest.raises(InputError, match="vitdecomp synth train clip"):
        load_shipped("clip", tmp_path)
    with pytest.raises(InputError, match="vitdecomp synth train spurious"):
        shipped_path("spurious", tmp_path / "nowhere")
    with pytest.raises(InputError, match="no shipped tiny model"):
        load_shipped("resnet", tmp_path)


# ----------------------------------------------------------------------------- position init, storage
def test_sincos_grid_shape_amplitude_and_distinct_rows():
    from vitdecomp.core.tiny import POSITION_AMPLITUDE, sincos_grid

    g = sincos_grid(16, 5)
    assert g.shape == (25, 16) and g.dtype == torch.float64
    assert float(g.abs().max()) <= POSITION_AMPLITUDE + 1e-12
    assert float(sincos_grid(16, 5, amplitude=0.5).abs().max()) <= 0.5 + 1e-12
    q = 16 // 4  # columns: sin(x w), cos(x w), sin(y w), cos(y w), q frequencies each
    assert torch.allclose(g[:, :q] ** 2 + g[:, q:2 * q] ** 2, torch.full((25, q), POSITION_AMPLITUDE ** 2, dtype=g.dtype))
    assert torch.equal(g.reshape(5, 5, 16)[:, 0, :2 * q], g.reshape(5, 5, 16)[:, 0, :2 * q][0].expand(5, -1))
    dist = torch.cdist(g, g) + torch.eye(25) * 1e9
    assert float(dist.min()) > 1e-3  # every grid position has its own code
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_grid(10, 3)


@pytest.mark.parametrize("shape", [(1, 17, 8), (17, 8), (16, 8)], ids=["timm", "open_clip", "no-cls"])
def test_sincos_position_init_fills_the_grid_and_zeroes_the_prefix(shape):
    from vitdecomp.core.tiny import sincos_grid, sincos_position_init

    pos = torch.nn.Parameter(torch.randn(*shape))
    sincos_position_init(pos)
    table = pos.detach().reshape(-1, 8)
    prefix = table.shape[0] - 16
    assert torch.equal(table[:prefix], torch.zeros(prefix, 8))
    assert torch.equal(table[prefix:], sincos_grid(8, 4).float())


def test_tiny_models_start_from_sincos_positions():
    pytest.importorskip("timm")
    pytest.importorskip("open_clip")
    from vitdecomp.core.tiny import build_tiny_clip, build_tiny_vit, sincos_grid

    codes = sincos_grid(128, 8).float()
    for table in (build_tiny_vit(0).pos_embed.detach()[0], build_tiny_clip(0).visual.positional_embedding.detach()):
        assert table.shape == (65, 128)
        assert torch.equal(table[0], torch.zeros(128)) and torch.equal(table[1:], codes)


def _float_tensors(module):
    return [t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()]


def test_round_to_storage_and_float16_files_round_trip_exactly(tmp_path):
    pytest.importorskip("timm")
    pytest.importorskip("safetensors")
    from safetensors import safe_open

    from vitdecomp.core.tiny import VIT_CONFIG, build_tiny_vit, load_tiny, read_sidecar, round_to_storage, save_tiny

    module = build_tiny_vit(3, num_classes=3).eval()
    assert any(not torch.equal(t.half().float(), t) for t in _float_tensors(module))  # the test can fail
    assert round_to_storage(module) is module
    assert all(torch.equal(t.half().float(), t) and t.dtype == torch.float32 for t in _float_tensors(module))
    save_tiny(module, tmp_path, {"kind": "vit", "num_classes": 3, "architecture": dict(VIT_CONFIG)})
    _, sidecar = read_sidecar(tmp_path)
    assert sidecar["storage_dtype"] == "float16"
    with safe_open(str(tmp_path / sidecar["weights"]), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    loaded = load_tiny(tmp_path)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.module(x), module(x))


def test_round_to_storage_refuses_values_outside_float16():
    from vitdecomp.core.tiny import round_to_storage

    layer = torch.nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight[0, 0] = 1e6
    with pytest.raises(ValueError, match="weight"):
        round_to_storage(layer)


def test_balanced_labeller_gives_equal_groups_and_class_values():
    from vitdecomp.synth.dataset import PLACES, SPURIOUS_GROUPS

    groups = SPURIOUS_GROUPS["shape"]
    sample = bench.make_sample(40, 3, 11, bench.balanced_labeller("shape", groups))
    y = np.array(sample.labels)
    place = np.array([PLACES.index(s.background) for s in sample.scenes])
    counts = np.bincount(2 * y + place, minlength=4)
    assert counts.tolist() == [10, 10, 10, 10]
    assert all(s.main.shape in groups[label] for s, label in zip(sample.scenes, sample.labels))
