"""The paper's score validation (docs/method.md §4, its Tables 2 and 4) on the synthetic world, end to end.

Generates a world, decomposes the shipped tiny CLIP, ViT and Swin over its training and test splits, aligns
the two non-CLIP training stores to the CLIP store with CompAlign (``vitdecomp align`` with its defaults, and
from a random start with ``--init random --objective orthogonal --lr 1e-2 --epochs 30``, a worse fit; one fit
per ``--seeds`` entry each), and
runs ``vitdecomp score STORE FEATURES... --validate`` with each fit on the training store (the rows it was
fitted on) and on the test store (images no fit saw), with the world's six factors as the features
(their phrases, ``synth.generator.factor_phrases``). Prints one markdown row per model, split and fit (mean and
range over the seeds): rows, features, component-ordering ρ and feature-ordering ρ (the corr score against
the CLIP proxy with the real CLIP image embedding), the held-out alignment cosine, and, for comparison, both
ρ against the proxy of a hand-built aligned stack (``CompAlign.apply``'s reference: the mapped sum instead
of the CLIP embedding). Every step is skipped when its output is already in ``--work``.

    python benchmarks/score_validate.py --work /tmp/vdval [--n 1000] [--seeds 0 1 2] [--json rows.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GOOD_FIT = ["--objective", "orthogonal", "--lr", "1e-2", "--epochs", "30"]


def _run(argv: list[str]) -> None:
    from vitdecomp.cli.main import main as cli

    code = cli(["-q", *argv])
    if code != 0:
        raise SystemExit(f"vitdecomp {' '.join(argv)} exited {code}")


def _mapped_sum_rho(store: Path, align: Path, features: dict[str, list[str]], table_json: dict) -> dict[str, float | None]:
    """Both ρ of the corr scores against the proxy whose ``Z`` is the mapped sum (the hand-built stack)."""
    import vitdecomp as vd
    from vitdecomp.core.labels import kind_mask
    from vitdecomp.interpret.inputs import open_alignment
    from vitdecomp.interpret.score import ScoreTable, clip_proxy_table, validate_ordering
    from vitdecomp.interpret.text import embed_templates, text_encoder
    from vitdecomp.store.component_store import ComponentStore

    st = ComponentStore.open(store)
    maps = open_alignment(align, st)
    encoder = text_encoder(vd.load("synth:clip"))
    texts = {name: embed_templates(encoder, t, "plain").double().numpy() for name, t in features.items()}
    table = ScoreTable.from_json(table_json)
    proxy = clip_proxy_table((maps.apply(s.sum_tokens()) for s in st.iter_batches()), texts, use_reference=False)
    keep = kind_mask(table.labels, "input")
    labels = tuple(lab for lab, k in zip(table.labels, keep) if k)
    res = validate_ordering(ScoreTable(table.scores[keep], labels, table.features),
                            ScoreTable(proxy.scores[keep], labels, proxy.features, "clip_proxy"))
    return {"component": res["component_order_rho"], "feature": res["feature_order_rho"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="working folder (default: a new temporary one)")
    parser.add_argument("--n", type=int, default=1000, help="images in the world (all splits)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="CompAlign seeds")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    import torch

    from vitdecomp.synth.generator import factor_phrases

    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-validate-"))
    work.mkdir(parents=True, exist_ok=True)
    world = work / "world"
    if not (world / "summary.json").is_file():
        _run(["synth", "generate", str(world), "--n", str(args.n), "--class-factor", "colour"])
    phrases = factor_phrases()
    feature_dir = work / "features"
    feature_dir.mkdir(exist_ok=True)
    files = []
    for name, texts in phrases.items():
        (feature_dir / f"{name}.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
        files.append(str(feature_dir / f"{name}.txt"))
    splits = {"train": "", "test": "_test"}  # the fit's images, and images no fit saw
    for m in ("clip", "vit", "swin"):
        for split, suffix in splits.items():
            if not (work / f"{m}{suffix}.zarr" / "manifest.json").is_file():
                _run(["decompose", f"synth:{m}", str(world / split), "--out", str(work / f"{m}{suffix}.zarr"),
                      "--store-dtype", "float32", "--batch-size", "50"])

    rows = []

    def score(store: str, fit: str, extra: list[str], align: Path | None) -> dict:
        out = work / f"score_{store}_{fit}"
        if not (out / "score.json").is_file():
            _run(["score", str(work / f"{store}.zarr"), *files, "--n-null", "0", "--validate", "--out", str(out),
                  *extra])
        payload = json.loads((out / "score.json").read_text(encoding="utf-8"))
        v = payload["validation"]
        o = v["orderings"]["corr"]
        row = {"model": f"synth:{store.split('_')[0]}", "images": "test" if store.endswith("_test") else "train",
               "fit": fit, "n": v["n_items"], "features": len(phrases), "components": len(v["components"]),
               "component_rho": o["component_order_rho"], "feature_rho": o["feature_order_rho"],
               "per_feature": o["per_feature"], "held_out_cosine": (v["alignment"] or {}).get("cosine_held_out")}
        if align is not None:
            row["mapped_sum"] = _mapped_sum_rho(work / f"{store}.zarr", align, phrases, payload["tables"]["corr"])
        rows.append(row)
        return row

    for suffix in splits.values():
        score(f"clip{suffix}", "-", [], None)
    fits = {"default": [], "random start, orthogonal, lr 1e-2, 30 epochs": ["--init", "random", *GOOD_FIT]}
    for m in ("vit", "swin"):
        for fit, flags in fits.items():
            for seed in args.seeds:
                key = f"{fit.replace(', ', '_').replace(' ', '_')}_s{seed}"
                folder = work / f"align_{m}_{key}"
                if not (folder / "align.json").is_file():
                    _run(["align", str(work / f"{m}.zarr"), "--clip-store", str(work / "clip.zarr"), "--out",
                          str(folder), *flags, "--seed", str(seed)])
                for suffix in splits.values():
                    row = score(f"{m}{suffix}", key, ["--align", str(folder), "--clip-store",
                                                      str(work / f"clip{suffix}.zarr")], folder)
                    row["fit"], row["seed"] = fit, seed

    def f(x: float | None) -> str:
        return "–" if x is None else f"{x:+.2f}"

    def summary(vals: list[float | None]) -> str:
        ok = [v for v in vals if v is not None]
        if not ok:
            return "–"
        return f(ok[0]) if len(ok) == 1 else f"{statistics.mean(ok):+.2f} ({min(ok):+.2f} .. {max(ok):+.2f})"

    print("| model | images | CompAlign fit | rows | features | component-ordering ρ | feature-ordering ρ "
          "| held-out cosine | ρ against the mapped-sum proxy (component / feature) |")
    print("|---|---|---|---|---|---|---|---|---|")
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in sorted(rows, key=lambda r: (r["model"] != "synth:clip", r["model"], r["images"] != "train")):
        groups.setdefault((r["model"], r["images"], r["fit"]), []).append(r)
    for (model, images, fit), rs in groups.items():
        ms = [r["mapped_sum"] for r in rs if "mapped_sum" in r]
        print(f"| {model} | {images} | {fit}{f' ({len(rs)} seeds)' if len(rs) > 1 else ''} | {rs[0]['n']} | "
              f"{rs[0]['features']} | {summary([r['component_rho'] for r in rs])} | "
              f"{summary([r['feature_rho'] for r in rs])} | {summary([r['held_out_cosine'] for r in rs])} | "
              + (f"{summary([m['component'] for m in ms])} / {summary([m['feature'] for m in ms])} |" if ms else "– |"))
    print("\nper-feature component-ordering ρ (mean over seeds):")
    for (model, images, fit), rs in groups.items():
        names = list(rs[0]["per_feature"])
        means = {k: statistics.mean([r["per_feature"][k] for r in rs if r["per_feature"][k] is not None]) for k in names}
        print(f"  {model} {images} {fit}: " + ", ".join(f"{k} {v:+.2f}" for k, v in means.items()))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
