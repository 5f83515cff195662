#!/usr/bin/env python
"""Retrieval by feature (``vitdecomp.apps.retrieve``): query latency over 50k items, index build time, and
building an index from a store against a plain forward pass.

Method:

* **Query latency** -- ``N`` (default 50,000) random unit vectors of width ``d`` (512: CLIP ViT-B;
  768: ViT-L / DeiT-B), ``G`` groups (default 4: three feature groups and the full representation,
  each its own index, as ``build_index`` makes them). Per group: build time of the faiss
  ``IndexScalarQuantizer(QT_fp16, METRIC_INNER_PRODUCT)`` (what ``build_index`` writes) and, for
  comparison, of an ``IndexFlatIP`` over the float16-decoded vectors (float32 storage, twice the
  memory). Then the median wall time of one query (top-10, ``Q`` distinct query vectors, one
  warm-up) through ``GroupIndex.search_vectors`` (faiss float16, and the numpy backend: exact
  blocked brute force over the float16 ``.npy``), through the flat faiss index, and a plain
  numpy baseline (``vectors_f32 @ q`` + ``argpartition``) over float32 vectors held in memory.
  The latency of one query does not depend on the data distribution (every method scans all ``N``).
* **Build from a store** -- a store with the component layout of an open_clip ViT-B-16 (random
  init, head granularity: 158 components x 512, float16, 64 items per chunk) holding ``S`` items
  of random values (written untimed), then ``build_index`` for 3 groups of 3 heads + the full
  group, timed (reads every chunk once), in items/s; against a plain forward pass of the same
  ViT-B-16 image tower (``encode_image``, batch 16, 224 px, ``no_grad``) in images/s, measured
  in the same run. The ratio says how much an index adds to a dataset run that wrote the store.

Threads: ``--threads`` (default 1) for torch, faiss (OpenMP) and BLAS.

Usage::

    python benchmarks/retrieval.py                        # 50k x {512, 768}, 4 groups, store of 2000
    python benchmarks/retrieval.py --quick                # 5k items, store of 256
    python benchmarks/retrieval.py --n 50000 --dims 768 --groups 8 --json retrieval.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _set_threads(n: int) -> None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


# BLAS reads its thread count when numpy is first imported: set it from --threads before that
_set_threads(int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv[:-1] else 1)

import numpy as np  # noqa: E402


def _median_ms(fn: Any, queries: np.ndarray) -> float:
    fn(queries[:1])  # warm-up
    times = []
    for i in range(1, len(queries)):
        t = time.perf_counter()
        fn(queries[i:i + 1])
        times.append(time.perf_counter() - t)
    return 1000.0 * float(np.median(times))


def _numpy_f32(vectors: np.ndarray, k: int) -> Any:
    def run(q: np.ndarray) -> np.ndarray:
        s = vectors @ q[0]
        top = np.argpartition(-s, k)[:k]
        return top[np.argsort(-s[top])]

    return run


def latency(n: int, dim: int, n_groups: int, n_queries: int, k: int, workdir: Path) -> dict[str, Any]:
    import faiss

    from vitdecomp.apps.retrieve import ComponentGroup, GroupIndex, VectorSink, unit_rows

    rng = np.random.default_rng(dim)
    rows = np.arange(n)
    ids = [f"img{i:06d}" for i in range(n)]
    out: dict[str, Any] = {"n": n, "dim": dim, "groups": n_groups, "k": k, "queries": n_queries - 1}
    build_sq, build_flat, build_npy = [], [], []
    first: dict[str, Any] = {}
    for g in range(n_groups):
        x = unit_rows(rng.standard_normal((n, dim)).astype(np.float32))
        t = time.perf_counter()
        sink = VectorSink("faiss", dim)
        for start in range(0, n, 1024):  # as build_index adds it: batch by batch
            sink.add(x[start:start + 1024])
        sink.save(workdir / f"g{g}.faiss")
        build_sq.append(time.perf_counter() - t)
        t = time.perf_counter()
        npy = VectorSink("numpy", dim)
        for start in range(0, n, 1024):
            npy.add(x[start:start + 1024])
        npy.save(workdir / f"g{g}.npy")
        build_npy.append(time.perf_counter() - t)
        t = time.perf_counter()
        flat = faiss.IndexFlatIP(dim)
        flat.add(x.astype(np.float16).astype(np.float32))
        build_flat.append(time.perf_counter() - t)
        if g == 0:
            first = {"x": x, "flat": flat}
    group = ComponentGroup.of(["a"])
    sq = GroupIndex(group, workdir / "g0.faiss", "faiss", dim, rows, ids)
    nb = GroupIndex(group, workdir / "g0.npy", "numpy", dim, rows, ids)
    queries = unit_rows(rng.standard_normal((n_queries, dim)).astype(np.float32))
    x32 = first["x"]
    out["build_s_per_group"] = {"faiss_sq_fp16": float(np.median(build_sq)),
                                "faiss_flat_f32": float(np.median(build_flat)),
                                "numpy_fp16": float(np.median(build_npy))}
    out["bytes_per_group"] = {"faiss_sq_fp16": (workdir / "g0.faiss").stat().st_size,
                              "numpy_fp16": (workdir / "g0.npy").stat().st_size, "faiss_flat_f32": n * dim * 4}
    out["query_ms"] = {
        "faiss_sq_fp16": _median_ms(lambda q: sq.search_vectors(q, k), queries),
        "numpy_fp16 (exact_search)": _median_ms(lambda q: nb.search_vectors(q, k), queries),
        "faiss_flat_f32": _median_ms(lambda q: first["flat"].search(q, k), queries),
        "numpy_f32 (matmul + argpartition)": _median_ms(_numpy_f32(x32, k), queries),
    }
    # all groups of one query (what `vitdecomp retrieve` does: feature groups + full)
    indexes = [GroupIndex(group, workdir / f"g{g}.faiss", "faiss", dim, rows, ids) for g in range(n_groups)]
    out["query_ms_all_groups_faiss"] = _median_ms(lambda q: [ix.search_vectors(q, k) for ix in indexes], queries)
    # batch throughput: Q queries at once
    sq.search_vectors(queries, k)
    t = time.perf_counter()
    sq.search_vectors(queries, k)
    out["batch_queries_per_s_faiss_sq"] = n_queries / (time.perf_counter() - t)
    # agreement of the float16 index with exact float32 search on the same decoded vectors
    dec = np.load(workdir / "g0.npy").astype(np.float32)
    p_sq, _ = sq.search_vectors(queries, k)
    p_ex = np.argsort(-(queries @ dec.T), axis=1, kind="stable")[:, :k]
    out["topk_overlap_faiss_vs_exact"] = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(p_sq, p_ex)]))
    for p in workdir.iterdir():
        p.unlink()
    return out


def store_build(n_items: int, n_forward: int, workdir: Path) -> dict[str, Any]:
    import torch

    import vitdecomp as vd
    from vitdecomp.apps.retrieve import ComponentGroup, build_index, full_group
    from vitdecomp.core.stack import ComponentStack
    from vitdecomp.store.component_store import ComponentStore, StoreConfig

    model = vd.load("open_clip:ViT-B-16", pretrained=False)
    pixels = torch.randn(16, 3, 224, 224)
    with torch.no_grad():
        probe = vd.decompose(model, pixels[:1], granularity="head")
    labels = probe.labels
    comp, dim = probe.n_components, probe.dim
    # plain forward pass of the same tower, images/s
    tower = model.module
    encode = getattr(tower, "encode_image", tower)
    with torch.no_grad():
        encode(pixels)
        t = time.perf_counter()
        done = 0
        while done < n_forward:
            encode(pixels)
            done += pixels.shape[0]
        fwd = done / (time.perf_counter() - t)
    cfg = StoreConfig(model="bench:vit-b-16-layout", weights="random", n_items=n_items, batch_size=64)
    store = ComponentStore.create_or_open(workdir / "s.zarr", cfg, labels=labels, comp_shape=(comp, dim))
    gen = torch.Generator().manual_seed(0)
    for index in range(store.n_chunks):
        r = store.chunk_rows(index)
        v = torch.randn(comp, len(r), dim, generator=gen)
        store.write_chunk(index, ComponentStack(v, labels, v.sum(0)), [f"img{i:06d}.png" for i in r])
    store.finalize()
    heads = [str(lab) for lab in labels if lab.kind == "head"]
    groups = [ComponentGroup(f"feature{j}", tuple(heads[3 * j * 7:3 * j * 7 + 3])) for j in range(3)] + [full_group()]
    t = time.perf_counter()
    build_index(store, groups, workdir / "idx")
    secs = time.perf_counter() - t
    store_bytes = sum(p.stat().st_size for p in (workdir / "s.zarr").rglob("*") if p.is_file())
    shutil.rmtree(workdir / "s.zarr")
    shutil.rmtree(workdir / "idx")
    return {"items": n_items, "components": comp, "dim": dim, "groups": len(groups), "store_mib": store_bytes / 2**20,
            "build_s": secs, "build_items_per_s": n_items / secs, "forward_images_per_s": fwd,
            "build_vs_forward": (n_items / secs) / fwd}


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"### Retrieval (`benchmarks/retrieval.py`)", "",
             f"{m['cpu']}, {m['threads']} thread(s), {m['date']}; faiss {m['faiss']}, numpy {m['numpy']}, "
             f"torch {m['torch']}. Top-{res['latency'][0]['k']}, median of {res['latency'][0]['queries']} single "
             "queries (one warm-up).", "",
             "| items | d | faiss fp16 (SQ) | numpy fp16 exact | faiss flat fp32 | numpy fp32 matmul "
             "| all groups, faiss | "
             "build / group (SQ) | build / group (flat) | index size / group | top-10 overlap vs exact |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["latency"]:
        q, b = r["query_ms"], r["build_s_per_group"]
        lines.append(
            f"| {r['n']:,} | {r['dim']} | {q['faiss_sq_fp16']:.1f} ms | {q['numpy_fp16 (exact_search)']:.1f} ms | "
            f"{q['faiss_flat_f32']:.1f} ms | {q['numpy_f32 (matmul + argpartition)']:.1f} ms | "
            f"{r['query_ms_all_groups_faiss']:.1f} ms ({r['groups']} groups) | {b['faiss_sq_fp16']:.2f} s | "
            f"{b['faiss_flat_f32']:.2f} s | {r['bytes_per_group']['faiss_sq_fp16'] / 2**20:.0f} MiB | "
            f"{r['topk_overlap_faiss_vs_exact']:.3f} |")
    s = res.get("store")
    if s:
        lines += ["", f"Building from a store ({s['items']:,} items, ViT-B-16 layout: {s['components']} components x "
                  f"{s['dim']}, float16, {s['store_mib']:.0f} MiB; {s['groups']} groups incl. full): "
                  f"{s['build_items_per_s']:.0f} items/s; plain ViT-B-16 forward (batch 16, 224 px): "
                  f"{s['forward_images_per_s']:.1f} images/s; ratio {s['build_vs_forward']:.0f}x "
                  "(an index costs a small fraction of the dataset run that wrote the store)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50_000, help="items per index (default 50000)")
    ap.add_argument("--dims", default="512,768", help="vector widths (default 512,768)")
    ap.add_argument("--groups", type=int, default=4, help="groups (indexes) per width (default 4)")
    ap.add_argument("--queries", type=int, default=51, help="single queries timed (+1 warm-up; default 51)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--store-items", type=int, default=2000, help="items of the store build (0: skip; default 2000)")
    ap.add_argument("--forward-images", type=int, default=32, help="images of the timed plain forward (default 32)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="5000 items, 2 groups, store of 256 items")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.groups, args.store_items, args.forward_images = 5000, 2, 256, 16
    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    res: dict[str, Any] = {"machine": {"cpu": cpu, "threads": args.threads, "faiss": faiss.__version__,
                                       "numpy": np.__version__, "torch": torch.__version__,
                                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
                           "latency": []}
    with tempfile.TemporaryDirectory(prefix="vitdecomp-retrieval-") as tmp:
        for dim in (int(d) for d in args.dims.split(",")):
            print(f"latency: n={args.n} d={dim} groups={args.groups} ...", file=sys.stderr, flush=True)
            res["latency"].append(latency(args.n, dim, args.groups, args.queries, args.k, Path(tmp)))
        if args.store_items:
            print(f"store build: {args.store_items} items ...", file=sys.stderr, flush=True)
            res["store"] = store_build(args.store_items, args.forward_images, Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
