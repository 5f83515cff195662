#!/usr/bin/env python
"""Time and peak memory of TextSpan's covariance form against its data-matrix (direct) form.

Synthetic, in memory, no model: a ViT-B head store's worth of CLIP-space head outputs, by
default the 48 heads of layers 8-11 (``--heads 48``), ``d = 512``, ``n = 10,000`` images, and
a pool of 3,000 random unit "text" embeddings. Each head's output is a low-rank model plus
noise, ``x = μ_h + z A_h + σ ε`` with ``z ~ N(0, diag(s²))`` of rank ``--latent`` (decaying
``s``); a quarter of the rows of ``A_h`` are pool texts, so the picks are meaningful. Every
(head, batch) block has its own seed, so both forms see exactly the same numbers.

* **covariance form** -- stream the images in batches of ``--batch`` (``[batch, heads, d]``),
  accumulate :class:`vitdecomp.store.component_store.RunningMoments` (``covariance=True``), then
  :func:`vitdecomp.interpret.textspan.textspan_heads` (``m``, ``r``). Holds one batch plus
  ``heads × d²`` float64.
* **direct form** -- per head, gather its ``[n, d]`` matrix and run
  :func:`vitdecomp.interpret.textspan.textspan_direct` (the reference ``clip_text_span`` algorithm:
  SVD of ``C``, then ``C̄ Tᵀ [n, M]`` per step). Holds ``n × d`` (and ``n × M``) per head.
  Holding every head at once, as the reference code does, would need ``n × heads × d``
  (printed as an estimate, not allocated).

Time excludes data generation (timed separately and subtracted). "data pass" is the
streaming accumulation (covariance form) or gathering each head's matrix (direct form);
"select" is the TextSpan step itself. Peak memory is
``tracemalloc``'s peak of traced allocations (numpy registers its buffers; BLAS scratch
space is not seen) from the start of each form, generated data included. The forms run one
after the other in this process; the table also says whether their picks agree.

Usage::

    python benchmarks/textspan.py                     # full size: ~1 GiB; the direct form is
                                                      # ~7 TFlop (n·M·d per step and head)
    python benchmarks/textspan.py --small             # smoke run: 4 heads, d=64, n=2,000
    python benchmarks/textspan.py --threads 1 --json textspan.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import tracemalloc
from typing import Any

MIB = 1024.0**2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="smoke run: 4 heads, d=64, n=2000, pool 300, m=5, r=16")
    p.add_argument("--heads", type=int, default=48, help="heads (components) in the store (default 48: layers 8-11)")
    p.add_argument("--dim", type=int, default=512, help="CLIP dimension d (default 512)")
    p.add_argument("--n", type=int, default=10_000, help="images (default 10,000)")
    p.add_argument("--pool", type=int, default=3_000, help="text pool size M (default 3,000)")
    p.add_argument("--batch", type=int, default=500, help="images per streamed batch (default 500)")
    p.add_argument("--latent", type=int, default=32, help="rank of each head's low-rank model (default 32)")
    p.add_argument("--noise", type=float, default=0.1, help="isotropic noise std (default 0.1)")
    p.add_argument("--m", type=int, default=10, help="texts per head (default 10)")
    p.add_argument("--rank", type=int, default=80, help="projection rank r (default 80)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="BLAS/OpenMP threads (sets OMP_NUM_THREADS etc.)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.small:
        args.heads, args.dim, args.n, args.pool, args.batch = 4, 64, 2_000, 300, 250
        args.latent, args.m, args.rank = 8, 5, 16
    return args


class Synth:
    """Deterministic per-(head, batch) synthetic head outputs (float32, like a store)."""

    def __init__(self, args: argparse.Namespace) -> None:
        import numpy as np

        self.np = np
        self.args = args
        rng = np.random.default_rng([args.seed, 0])
        t = rng.standard_normal((args.pool, args.dim))
        self.texts = [f"text {i:05d}" for i in range(args.pool)]
        self.text_embeddings = t / np.linalg.norm(t, axis=1, keepdims=True)
        k = args.latent
        self.scales = np.geomspace(3.0, 0.3, k)
        self.mix: list[Any] = []
        self.means: list[Any] = []
        for h in range(args.heads):
            hr = np.random.default_rng([args.seed, 1, h])
            a = hr.standard_normal((k, args.dim)) / np.sqrt(args.dim)
            planted = hr.choice(args.pool, size=max(1, k // 4), replace=False)
            a[: len(planted)] = self.text_embeddings[planted]  # the strongest directions are texts
            self.mix.append(a)
            self.means.append(hr.standard_normal(args.dim) * 0.5)
        self.n_batches = -(-args.n // args.batch)
        self.gen_seconds = 0.0

    def rows(self, b: int) -> int:
        return min(self.args.batch, self.args.n - b * self.args.batch)

    def head_batch(self, h: int, b: int) -> Any:
        """``[rows(b), d]`` float32 outputs of head ``h`` for the images of batch ``b``."""
        np = self.np
        t0 = time.perf_counter()
        rng = np.random.default_rng([self.args.seed, 2, h, b])
        n = self.rows(b)
        z = rng.standard_normal((n, self.args.latent)) * self.scales
        x = self.means[h] + z @ self.mix[h] + self.args.noise * rng.standard_normal((n, self.args.dim))
        out = x.astype(np.float32)
        self.gen_seconds += time.perf_counter() - t0
        return out


def run_covariance(syn: Synth) -> tuple[dict[str, float], list[Any]]:
    from vitdecomp.store.component_store import RunningMoments
    from vitdecomp.interpret.textspan import textspan_heads

    np, a = syn.np, syn.args
    gc.collect()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    syn.gen_seconds = 0.0
    t0 = time.perf_counter()
    moments = RunningMoments(a.heads, a.dim, covariance=True)
    for b in range(syn.n_batches):
        batch = np.stack([syn.head_batch(h, b) for h in range(a.heads)], axis=1)  # [batch, heads, d]
        moments.update(batch)
        del batch
    t1 = time.perf_counter()
    gen = syn.gen_seconds
    labels = [f"H{h:02d}" for h in range(a.heads)]
    results = textspan_heads(moments, labels, syn.texts, syn.text_embeddings, m=a.m, rank=a.rank)
    t2 = time.perf_counter()
    peak = tracemalloc.get_traced_memory()[1] - base
    return {"accumulate_s": t1 - t0 - gen, "select_s": t2 - t1, "total_s": t2 - t0 - gen,
            "generate_s": gen, "peak_mib": peak / MIB}, results


def run_direct(syn: Synth) -> tuple[dict[str, float], list[Any]]:
    from vitdecomp.interpret.textspan import textspan_direct

    np, a = syn.np, syn.args
    gc.collect()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    syn.gen_seconds = 0.0
    gather = select = 0.0
    results = []
    for h in range(a.heads):
        t0 = time.perf_counter()
        gen0 = syn.gen_seconds
        data = np.concatenate([syn.head_batch(h, b) for b in range(syn.n_batches)])  # [n, d]
        t1 = time.perf_counter()
        gather += (t1 - t0) - (syn.gen_seconds - gen0)
        results.append(textspan_direct(data, syn.texts, syn.text_embeddings, m=a.m, rank=a.rank, label=f"H{h:02d}"))
        select += time.perf_counter() - t1
        del data
    peak = tracemalloc.get_traced_memory()[1] - base
    return {"accumulate_s": gather, "select_s": select, "total_s": gather + select,
            "generate_s": syn.gen_seconds, "peak_mib": peak / MIB}, results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    import numpy as np  # after the thread settings

    tracemalloc.start()
    syn = Synth(args)
    cov, res_cov = run_covariance(syn)
    direct, res_dir = run_direct(syn)
    tracemalloc.stop()

    same = sum(rc.indices == rd.indices for rc, rd in zip(res_cov, res_dir))
    dfrac = max(float(np.max(np.abs(np.subtract(rc.variance_explained, rd.variance_explained)), initial=0.0))
                for rc, rd in zip(res_cov, res_dir) if len(rc.indices) == len(rd.indices))
    all_heads_mib = args.n * args.heads * args.dim * 4 / MIB

    print(f"TextSpan benchmark: {args.heads} heads, d={args.dim}, n={args.n}, pool M={args.pool}, "
          f"m={args.m}, r={args.rank}, batch={args.batch}  ({platform.machine()}, numpy {np.__version__}, "
          f"threads={args.threads or 'default'})")
    print(f"{'form':<24}{'data pass s':>14}{'select s':>10}{'total s':>10}{'peak MiB':>11}")
    for name, row in (("covariance (streamed)", cov), ("direct (n×d per head)", direct)):
        print(f"{name:<24}{row['accumulate_s']:>14.3f}{row['select_s']:>10.3f}{row['total_s']:>10.3f}"
              f"{row['peak_mib']:>11.1f}")

    def ratio(key: str) -> str:
        return f"{direct[key] / cov[key]:.2f}x" if cov[key] > 0 else "n/a"

    print(f"{'ratio direct/covariance':<24}{ratio('accumulate_s'):>14}{ratio('select_s'):>10}"
          f"{ratio('total_s'):>10}{ratio('peak_mib'):>11}")
    print(f"direct form holding all heads (float32 n×heads×d, not run): {all_heads_mib:.1f} MiB of data alone")
    print(f"data generation (excluded): covariance {cov['generate_s']:.2f} s, direct {direct['generate_s']:.2f} s")
    print(f"agreement: same picks in {same}/{args.heads} heads, max |Δ variance fraction| = {dfrac:.2e}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "covariance": cov, "direct": direct, "same_picks": same,
                       "max_fraction_diff": dfrac, "all_heads_mib": all_heads_mib,
                       "python": sys.version, "numpy": np.__version__}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
