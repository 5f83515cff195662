#!/usr/bin/env python
"""Cost of a CompAlign fit streamed from two stores (``vitdecomp align``) against reading them.

Method: two float32 stores of N rows are written once under a temp folder (a "model" store of
``COMP`` components of width ``D_MODEL``, chunk 256; a "CLIP" store whose reference rows are
``D_CLIP`` wide, chunk 200, so the chunk grids differ as they may in practice). Then, in this
process, on the same rows:

1. **read**: one pass of :func:`vitdecomp.interpret.align.store_batches` (both stores, ids checked, rows
   valid in both), nothing computed -- the I/O floor of every fit pass;
2. **fit, streamed**: :func:`vitdecomp.interpret.align.fit_compalign` for one epoch (one training pass that
   also evaluates the initial state on the held-out rows, plus one evaluation pass of the final
   state), for ``--objective penalty`` and ``orthogonal``;
3. **fit, in memory**: the same fit from tensors already in memory (no store reads).

Ratios: streamed fit / (2 x read) (the fit makes two passes), and streamed / in-memory (the share
of the store reads). These fits start from a random isometry at the published learning rate (3e-4), as
before the closed-form start existed, so the figures stay comparable.

``--section start`` (also in ``all``): the closed-form start (docs/method.md §3, ``AlignConfig.init``)
against the published settings, on what each reaches and what it costs:

4. **planted**: the same exactly solvable problem (``y = Σ_i Q_i c_i``, random isometries ``Q_i``) with
   ``--start-rows`` rows (default 3000), fitted from memory with ``AlignConfig.published()`` (random
   start, lr 3e-4, 2 epochs, batch 32), ``AlignConfig()`` (the defaults: least-squares start, then the
   penalty objective) and ``AlignConfig(parametrisation="orthogonal")`` (not above 10,000 rows: its
   QR steps take many minutes there): held-out cosine, epochs run, converged or not, fit time, and the
   time of the closed-form start alone (:func:`closed_form_maps`);
5. **swin** (``--swin``): the shipped tiny Swin into the shipped tiny CLIP, stores of a generated world
   (600 scenes, seed 0, colour task: 420 train / 90 test rows, as tutorial 2), fitted streamed from the
   stores with the settings above plus tutorial 2's ``orthogonal, lr 1e-2, 30 epochs`` from a random start;
   held-out (validation) and test-split cosines and fit times.

Timings are the best of ``--repeat`` runs (torch threads: ``--threads``).

Usage::

    python benchmarks/align.py --quick          # N=2048, COMP=26, D=128 (the shipped tiny ViT's shape)
    python benchmarks/align.py --section start --start-rows 3000,30000 --swin
    python benchmarks/align.py --rows 20000 --comp 50 --d-model 384 --d-clip 512
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from _timing import best_of


def _write(path: Path, values: np.ndarray, ref: np.ndarray, names: list[str], chunk: int) -> None:
    from vitdecomp import ComponentStack
    from vitdecomp.core.labels import parse_label
    from vitdecomp.store.component_store import ComponentStore, StoreConfig

    n, comp, d = values.shape
    cfg = StoreConfig(model=f"bench-{d}", weights="none", dtype="float32", n_items=n, batch_size=chunk)
    store = ComponentStore.create_or_open(path, cfg, names, (comp, d), ref.shape[1])
    labels = tuple(parse_label(s) for s in names)
    for i in range(-(-n // chunk)):
        lo, hi = i * chunk, min((i + 1) * chunk, n)
        stack = ComponentStack(torch.from_numpy(values[lo:hi]).movedim(0, 1).contiguous(), labels,
                               torch.from_numpy(ref[lo:hi]))
        store.write_chunk(i, stack, [f"img{j:07d}" for j in range(lo, hi)], {})


def _planted(n: int, comp: int, dm: int, dc: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``c [n, comp, dm]`` standard normal and ``y = Σ_i Q_i c_i [n, dc]`` with random (co-)isometries ``Q_i``."""
    gen = np.random.default_rng(seed)
    c = gen.standard_normal((n, comp, dm), dtype=np.float32)
    maps = np.linalg.qr(gen.standard_normal((comp, max(dm, dc), min(dm, dc))))[0]
    maps = maps if dc >= dm else maps.transpose(0, 2, 1)
    y = np.einsum("bcm,ckm->bk", c, maps.astype(np.float32)).astype(np.float32)
    return c, y


def _configs() -> dict[str, object]:
    from vitdecomp.interpret.align import AlignConfig

    return {"published (random start, lr 3e-4, 2 epochs)": AlignConfig.published(),
            "default (least-squares start, penalty)": AlignConfig(),
            "default, orthogonal": AlignConfig(parametrisation="orthogonal")}


def _summary(align: object) -> dict[str, object]:
    meta = align.meta  # type: ignore[attr-defined]
    return {"val_cosine": meta["val_cosine"], "start_val_cosine": meta["history"][0]["val_cosine"],
            "epochs_run": len(meta["train_loss"]), "best_epoch": meta["best_epoch"], "converged": meta["converged"],
            "warnings": meta["warnings"], "init": meta["init"]}


def _start_planted(n: int, comp: int, dm: int, dc: int, repeat: int) -> dict[str, object]:
    """Section 4: the planted problem of ``n`` rows, from memory."""
    from vitdecomp.interpret.align import AlignConfig, closed_form_maps, fit_compalign, resolve_constraint

    c, y = _planted(n, comp, dm, dc)
    ct, yt = torch.from_numpy(c), torch.from_numpy(y)

    def memory() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return [(ct[i : i + 256], yt[i : i + 256], torch.arange(i, min(i + 256, n))) for i in range(0, n, 256)]

    out: dict[str, object] = {"rows": n}
    fit_compalign(lambda: memory()[:2], comp, dm, dc, AlignConfig(epochs=1))  # warm-up (imports, allocator)
    for name, cfg in _configs().items():
        if n > 10_000 and "orthogonal" in name:  # up to 10 epochs of QR steps: many minutes on a CPU
            continue
        fits: list[object] = []
        seconds = best_of(repeat, lambda cfg=cfg, fits=fits: fits.append(fit_compalign(memory, comp, dm, dc, cfg)))
        entry = {"fit_s": seconds, **_summary(fits[-1])}
        if cfg.init == "lstsq":  # type: ignore[attr-defined]
            side = resolve_constraint(cfg, dm, dc)  # type: ignore[arg-type]
            entry["closed_form_start_s"] = best_of(
                repeat, lambda cfg=cfg, side=side: closed_form_maps(memory, comp, dm, dc, cfg, side))
        out[name] = entry
        print(f"planted {n} rows, {name}: held-out cosine {entry['val_cosine']:.4f} in {seconds:.2f} s", flush=True)
    return out


def _start_swin(repeat: int) -> dict[str, object]:
    """Section 5: the shipped tiny Swin into the shipped tiny CLIP, streamed from stores."""
    import vitdecomp as vd
    from vitdecomp.interpret.align import AlignConfig, fit_compalign, store_batches
    from vitdecomp.synth import generate_dataset

    configs = {"tutorial 2 (orthogonal, random start, lr 1e-2, 30 epochs)": AlignConfig(
        parametrisation="orthogonal", init="random", lr=1e-2, epochs=30, patience=None), **_configs()}
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_dataset(root / "world", 600, seed=0, task="colour")
        stores = {}
        for split in ("train", "test"):
            for name in ("swin", "clip"):
                run = vd.decompose_dataset(vd.load(f"synth:{name}"), root / "world" / split,
                                           root / f"{name}-{split}.zarr", batch_size=64, progress=False)
                stores[name, split] = run.store
        train = store_batches(stores["swin", "train"], stores["clip", "train"])
        test = store_batches(stores["swin", "test"], stores["clip", "test"])
        n_comp, dm = len(stores["swin", "train"].labels), int(stores["swin", "train"].comp_shape[-1])
        dc = int(stores["clip", "train"].ref_dim)
        out.update(rows={"train_store": stores["swin", "train"].n_items, "test_store": stores["swin", "test"].n_items},
                   comp=n_comp, d_model=dm, d_clip=dc)
        for name, cfg in configs.items():
            fits: list[object] = []
            seconds = best_of(repeat, lambda cfg=cfg, fits=fits: fits.append(fit_compalign(train, n_comp, dm, dc, cfg)))
            align = fits[-1]
            entry = {"fit_s": seconds, **_summary(align),
                     "test_cosine": align.metrics(test)["cosine"],  # type: ignore[attr-defined]
                     "defect_max": float(align.defects()[0].max())}  # type: ignore[attr-defined]
            out[name] = entry
            print(f"swin -> clip, {name}: held-out {entry['val_cosine']:.4f}, test {entry['test_cosine']:.4f} "
                  f"in {seconds:.2f} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--comp", type=int, default=26)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--d-clip", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32, help="optimiser step rows (AlignConfig default)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="2048 rows")
    ap.add_argument("--section", choices=("stream", "start", "all"), default="all")
    ap.add_argument("--start-rows", default="3000", help="comma-separated row counts of the planted start section")
    ap.add_argument("--swin", action="store_true", help="start section: also the shipped tiny Swin -> tiny CLIP")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.rows = 2048
    torch.set_num_threads(args.threads)

    from vitdecomp.interpret.align import AlignConfig, fit_compalign, store_batches
    from vitdecomp.store.component_store import ComponentStore

    n, comp, dm, dc = args.rows, args.comp, args.d_model, args.d_clip
    c, y = _planted(n, comp, dm, dc)
    names = [f"L{i // 6:02d}.H{i % 6:02d}" for i in range(comp)]
    result: dict[str, object] = {"rows": n, "comp": comp, "d_model": dm, "d_clip": dc, "threads": args.threads,
                                 "batch_size": args.batch_size}
    if args.section in ("start", "all"):
        result["start"] = {"planted": [_start_planted(int(r), comp, dm, dc, args.repeat)
                                       for r in args.start_rows.split(",")]}
        if args.swin:
            result["start"]["swin"] = _start_swin(args.repeat)  # type: ignore[index]
    if args.section == "start":
        print(json.dumps(result, indent=2))
        if args.json is not None:
            args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        return
    with tempfile.TemporaryDirectory() as tmp:
        _write(Path(tmp) / "m.zarr", c, c.sum(1), names, 256)
        _write(Path(tmp) / "c.zarr", y[:, None], y, ["embed"], 200)
        store, clip = ComponentStore.open(Path(tmp) / "m.zarr"), ComponentStore.open(Path(tmp) / "c.zarr")
        source = store_batches(store, clip)

        def read() -> None:
            for _ in source():
                pass

        read()  # warm the page cache
        t_read = best_of(args.repeat, read)
        result["read_pass_s"] = t_read
        ct, yt = torch.from_numpy(c), torch.from_numpy(y)

        def memory() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
            return [(ct[i : i + 256], yt[i : i + 256], torch.arange(i, min(i + 256, n))) for i in range(0, n, 256)]

        for objective in ("penalty", "orthogonal"):
            cfg = AlignConfig(parametrisation=objective, epochs=1, batch_size=args.batch_size, patience=None,
                              init="random", lr=3e-4)
            fit_compalign(memory, comp, dm, dc, cfg)  # warm-up (imports, allocator)
            t_fit = best_of(args.repeat, lambda cfg=cfg: fit_compalign(source, comp, dm, dc, cfg))
            t_mem = best_of(args.repeat, lambda cfg=cfg: fit_compalign(memory, comp, dm, dc, cfg))
            result[objective] = {"fit_streamed_s": t_fit, "fit_in_memory_s": t_mem,
                                 "streamed_over_two_reads": t_fit / (2 * t_read),
                                 "streamed_over_in_memory": t_fit / t_mem,
                                 "train_rows_per_s": 0.9 * n / max(t_fit - t_read, 1e-9)}
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
