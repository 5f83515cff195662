#!/usr/bin/env python
"""Throughput and peak memory of ``vitdecomp.decompose_dataset`` against a plain forward pass.

Method:

* **Data** -- N generated PNG images (deterministic: image ``i`` comes from
  ``numpy.random.default_rng(SEED + i)``; a smooth random pattern plus noise, sides drawn
  from 192..320 px), written once to ``DATA_DIR/N`` (default base ``/tmp/vitdecomp-bench-data``)
  and reused while its marker file matches. The parent reads every file once before
  launching a child, so the page cache is warm for every timed pass.
* **One fresh subprocess per N** (this script re-invoked with ``--child SPEC``): build the
  model (``vitdecomp.load("timm:NAME", pretrained=False)``), run one untimed warm-up batch
  through the reader and the forward, ``gc.collect()`` + ``malloc_trim(0)``, read the RSS
  baseline. Then, over the SAME images with the SAME reader (``iter_batches`` with the
  model's transform, same batch size and ``num_workers``):

  1. plain forward (the module's own forward, ``no_grad``), timed;
  2. ``decompose_dataset`` into a fresh store (peak RSS counter reset just before, read
     just after; a sampler thread records RSS every 0.2 s to show growth within the run);
  3. plain forward again, timed.

  The forward figure is the mean of the two forwards (they bracket the decompose run, so a
  drift of the machine shows as a gap between them). Times include reading and decoding the
  images in both cases (``num_workers=0`` decodes in the timed process).
* **Store figures** -- bytes on disk (sum of file sizes under the store), write throughput
  (store bytes / the manifest's summed per-chunk ``write_s``, i.e. the time inside
  ``ComponentStore.write_chunk``), and the manifest's max relative Σ error.

Peak RSS is of the child process only (DataLoader workers are separate processes; their
largest peak is reported as ``worker_peak_rss_mib``). ``--sizes 1000,10000`` shows whether
the decompose run's peak stays flat as the dataset grows.

Usage::

    python benchmarks/dataset.py --quick                               # vit_tiny, 64 images, batch 16
    python benchmarks/dataset.py --sizes 1000,10000 --json ds.json     # ViT-B/16, batch 32
    python benchmarks/dataset.py --device cuda --sizes 10000 --num-workers 8
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decompose import RESULT_TAG, _peak_rss_mib, _reset_peak_rss, _rss_mib, _trim, launch, machine_info  # noqa: E402

SEED = 20240601
DATA_VERSION = 1  # bump when the generator changes (invalidates cached data sets)
MARKER = ".vitdecomp-bench-data.json"  # hidden: ImageFolder skips it
DEFAULT_DATA_DIR = "/tmp/vitdecomp-bench-data"
SIDE_RANGE = (192, 320)

# --------------------------------------------------------------------------- data


def _image_array(i: int) -> Any:
    """Image ``i`` as ``uint8 [h, w, 3]``: a smooth random pattern plus noise (deterministic)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(SEED + i)
    h, w = (int(v) for v in rng.integers(SIDE_RANGE[0], SIDE_RANGE[1] + 1, size=2))
    coarse = rng.integers(0, 256, size=(int(rng.integers(4, 17)), int(rng.integers(4, 17)), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.int16)
    noise = rng.integers(-12, 13, size=(h, w, 3), dtype=np.int16)
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def ensure_dataset(root: Path, n: int) -> tuple[Path, float]:
    """``root`` holding images ``img_000000.png ..`` (n of them); (root, seconds spent generating)."""
    from PIL import Image

    meta = {"version": DATA_VERSION, "seed": SEED, "n": n, "sides": list(SIDE_RANGE)}
    marker = root / MARKER
    try:
        if json.loads(marker.read_text()) == meta:
            return root, 0.0
    except (OSError, ValueError):
        pass
    t = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    wanted = {f"img_{i:06d}.png" for i in range(n)}
    for p in root.iterdir():  # a stale set of another size or version: drop what does not belong
        if p.name not in wanted and p.name != MARKER:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
    for i in range(n):
        path = root / f"img_{i:06d}.png"
        tmp = root / f".tmp-{os.getpid()}-{path.name}"  # hidden until complete
        Image.fromarray(_image_array(i)).save(tmp, format="PNG", compress_level=6)
        os.replace(tmp, path)
        if (i + 1) % 1000 == 0:
            print(f"  generated {i + 1}/{n} images in {root}", flush=True)
    marker.write_text(json.dumps(meta))
    return root, time.perf_counter() - t


def warm_page_cache(root: Path) -> int:
    """Read every file once (so no timed pass pays for a cold disk); returns the bytes read."""
    total = 0
    for p in sorted(root.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            total += len(p.read_bytes())
    return total


def dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


# --------------------------------------------------------------------------- child


class _RssSampler(threading.Thread):
    """Samples the process RSS every ``interval`` seconds while running."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._halt = threading.Event()
        self._t0 = time.perf_counter()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append((time.perf_counter() - self._t0, _rss_mib()))
            self._halt.wait(self.interval)

    def stop(self) -> list[tuple[float, float]]:
        self._halt.set()
        self.join()
        self.samples.append((time.perf_counter() - self._t0, _rss_mib()))
        return self.samples


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _forward_pass(m: Any, source: Any, spec: dict[str, Any], chunks: list[int]) -> tuple[float, int]:
    """The module's own forward over ``chunks`` of ``source`` through the dataset reader: (seconds, images)."""
    import torch

    from vitdecomp.data.datasets import iter_batches

    device = spec["device"]
    n = 0
    t = time.perf_counter()
    with torch.no_grad():
        for _, batch in iter_batches(source, m.transform, spec["batch_size"], chunks, num_workers=spec["num_workers"]):
            if batch.pixels is not None:
                out = m.module(batch.pixels.to(device=m.device, dtype=m.dtype))
                n += int(batch.valid.sum())
                del out
            del batch
    _sync(device)
    return time.perf_counter() - t, n


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    import resource

    import torch

    import vitdecomp as vd
    from vitdecomp.data.datasets import open_dataset

    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    cuda = device.startswith("cuda")
    out: dict[str, Any] = {"n": spec["n"], "model": spec["model"], "batch_size": spec["batch_size"]}
    out["rss_start_mib"] = _rss_mib()
    t = time.perf_counter()
    m = vd.load("timm:" + spec["model"], pretrained=False, device=device)
    m.module.eval()
    out["build_s"] = time.perf_counter() - t
    tensors = [*m.module.parameters(), *m.module.buffers()]
    out["weights_mib"] = sum(p.numel() * p.element_size() for p in tensors) / 2**20
    _trim()
    out["rss_after_build_mib"] = _rss_mib()

    source = open_dataset(spec["data"], kind="folder")
    if len(source) != spec["n"]:
        raise RuntimeError(f"{spec['data']} has {len(source)} images, expected {spec['n']}")
    n_chunks = -(-len(source) // spec["batch_size"])
    chunks = list(range(n_chunks))

    # warm-up: one batch through the reader and the forward (kernels, thread pools, PIL codecs)
    _forward_pass(m, source, spec, chunks[:1])
    _trim()
    if cuda:
        torch.cuda.empty_cache()
    out["rss_baseline_mib"] = _rss_mib()
    out["peak_reset"] = _reset_peak_rss()

    # 1. forward
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated() / 2**20
    fwd1_s, fwd_images = _forward_pass(m, source, spec, chunks)
    out["forward_peak_rss_mib"] = _peak_rss_mib()
    if cuda:
        out["forward_cuda_peak_delta_mib"] = torch.cuda.max_memory_allocated() / 2**20 - cuda_base
    _trim()

    # 2. decompose_dataset into a fresh store
    out["rss_before_decompose_mib"] = _rss_mib()
    _reset_peak_rss()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated() / 2**20
    sampler = _RssSampler(spec["sample_interval"])
    sampler.start()
    t = time.perf_counter()
    run = vd.decompose_dataset(
        m, source, spec["store"], batch_size=spec["batch_size"], granularity=spec["granularity"],
        store_dtype=spec["store_dtype"], num_workers=spec["num_workers"], progress=False,
    )
    dec_total_s = time.perf_counter() - t
    samples = sampler.stop()
    out["decompose_peak_rss_mib"] = _peak_rss_mib()
    out["rss_after_decompose_mib"] = _rss_mib()
    if cuda:
        out["decompose_cuda_peak_delta_mib"] = torch.cuda.max_memory_allocated() / 2**20 - cuda_base
    manifest = run.manifest
    _trim()

    # 3. forward again (brackets the decompose run: machine drift shows as a gap between the two)
    fwd2_s, _ = _forward_pass(m, source, spec, chunks)

    fwd_mean = (fwd1_s + fwd2_s) / 2
    store_bytes = dir_bytes(Path(spec["store"]))
    write_s = float(manifest["timing"]["write_s"] or 0.0)
    out.update(
        images=run.images,
        forward_images=fwd_images,
        skipped=len(run.skipped),
        complete=bool(manifest.get("complete")),
        forward_s=[fwd1_s, fwd2_s],
        forward_mean_s=fwd_mean,
        forward_ips=fwd_images / fwd_mean if fwd_mean > 0 else None,
        forward_drift=fwd2_s / fwd1_s if fwd1_s > 0 else None,
        decompose_loop_s=run.seconds,
        decompose_total_s=dec_total_s,
        decompose_ips=run.images_per_second,
        time_ratio=run.seconds / fwd_mean if fwd_mean > 0 else None,
        time_ratio_total=dec_total_s / fwd_mean if fwd_mean > 0 else None,
        manifest_compute_s=manifest["timing"]["compute_s"],
        manifest_write_s=write_s,
        store_bytes=store_bytes,
        store_mib=store_bytes / 2**20,
        store_bytes_per_image=store_bytes / max(run.images, 1),
        write_mib_s=store_bytes / 2**20 / write_s if write_s > 0 else None,
        error_max=manifest["error"]["max"],
        error_stored_max=manifest["error"]["stored_max"],
        comp_shape=manifest["comp_shape"],
        n_components=len(manifest["labels"]),
    )
    base = out["rss_baseline_mib"]
    out["forward_rss_delta_mib"] = max(out["forward_peak_rss_mib"] - base, 0.0)
    out["decompose_rss_delta_mib"] = max(out["decompose_peak_rss_mib"] - base, 0.0)
    out["decompose_rss_delta_after_build_mib"] = max(out["decompose_peak_rss_mib"] - out["rss_after_build_mib"], 0.0)
    # growth within the run: max RSS of the last quarter of the chunk loop minus that of the first quarter
    if len(samples) >= 8:
        q = max(len(samples) // 4, 1)
        out["rss_first_quarter_max_mib"] = max(r for _, r in samples[:q])
        out["rss_last_quarter_max_mib"] = max(r for _, r in samples[-q:])
        out["rss_growth_mib"] = out["rss_last_quarter_max_mib"] - out["rss_first_quarter_max_mib"]
    step = max(1, len(samples) // 200)
    out["rss_samples"] = [[round(t, 2), round(r, 1)] for t, r in samples[::step]]
    out["worker_peak_rss_mib"] = (
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 if spec["num_workers"] > 0 else None
    )
    return out


# --------------------------------------------------------------------------- parent




def _fmt(v: Any, spec: str, width: int) -> str:
    return f"{v:{width}{spec}}" if isinstance(v, (int, float)) and not isinstance(v, bool) else f"{'-':>{width}}"


def print_table(results: list[dict[str, Any]], cuda: bool) -> None:
    hdr = (
        f"{'N':>7} {'fwd img/s':>9} {'drift':>6} {'dec img/s':>9} {'x fwd':>6} {'x total':>7} "
        f"{'store MiB':>9} {'KiB/img':>8} {'wr MiB/s':>8} {'max err':>8} "
        f"{'RSS base':>8} {'fwd peak':>8} {'dec peak':>8} {'dec dRSS':>8} {'growth':>7}"
        + (f" {'GPU fwd':>8} {'GPU dec':>8}" if cuda else "")
    )
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        if "failed" in r:
            print(f"{r['n']:>7} FAILED: {r['failed']}")
            continue
        line = (
            f"{r['n']:>7} {_fmt(r.get('forward_ips'), '.1f', 9)} {_fmt(r.get('forward_drift'), '.2f', 6)} "
            f"{_fmt(r.get('decompose_ips'), '.1f', 9)} {_fmt(r.get('time_ratio'), '.2f', 6)} "
            f"{_fmt(r.get('time_ratio_total'), '.2f', 7)} {_fmt(r.get('store_mib'), '.1f', 9)} "
            f"{_fmt(r.get('store_bytes_per_image', 0) / 1024, '.0f', 8)} {_fmt(r.get('write_mib_s'), '.0f', 8)} "
            f"{_fmt(r.get('error_max'), '.1e', 8)} {_fmt(r.get('rss_baseline_mib'), '.0f', 8)} "
            f"{_fmt(r.get('forward_peak_rss_mib'), '.0f', 8)} {_fmt(r.get('decompose_peak_rss_mib'), '.0f', 8)} "
            f"{_fmt(r.get('decompose_rss_delta_mib'), '.0f', 8)} {_fmt(r.get('rss_growth_mib'), '.0f', 7)}"
        )
        if cuda:
            line += (
                f" {_fmt(r.get('forward_cuda_peak_delta_mib'), '.0f', 8)}"
                f" {_fmt(r.get('decompose_cuda_peak_delta_mib'), '.0f', 8)}"
            )
        print(line)
    print()
    print("fwd img/s: plain forward over the same reader, mean time of the passes before and after the decompose run;")
    print("  drift = second forward time / first. dec img/s: decompose_dataset's chunk loop (read, decompose, stats,")
    print("  write). x fwd = decompose loop time / mean forward time; x total = whole decompose_dataset call")
    print("  (probe, weights digest, store creation, merge, manifest) / mean forward time.")
    print("store MiB: file sizes under the store; wr MiB/s = store bytes / summed write_s of the manifest;")
    print("  max err = manifest's max relative Σ error (float64, before the store's dtype cast).")
    print("RSS (MiB, this process only): base = after build + 1 warm-up batch; fwd/dec peak = VmHWM over each run;")
    print("  dec dRSS = dec peak - base; growth = max RSS in the last quarter of the run - in the first quarter.")
    if cuda:
        print("GPU: max_memory_allocated above the allocation before each run (MiB).")
    done = [r for r in results if "failed" not in r]
    if len(done) >= 2:
        lo, hi = done[0], done[-1]
        print(
            f"Peak RSS from N={lo['n']} to N={hi['n']}: {lo['decompose_peak_rss_mib']:.0f} -> "
            f"{hi['decompose_peak_rss_mib']:.0f} MiB (dRSS {lo['decompose_rss_delta_mib']:.0f} -> "
            f"{hi['decompose_rss_delta_mib']:.0f} MiB)"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help="timm model name, random weights (default vit_base_patch16_224)")
    p.add_argument("--sizes", default=None, help="comma list of dataset sizes N (default 256)")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch / store chunk (default 32)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader decoding workers (default 0)")
    p.add_argument("--granularity", default="head", choices=["layer", "head", "head_token"])
    p.add_argument("--store-dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="base of the image cache; N images in DATA_DIR/N")
    p.add_argument("--store-dir", default=None, help="where the temporary stores go (default: the system temp dir)")
    p.add_argument("--keep-store", action="store_true", help="do not delete the stores afterwards")
    p.add_argument("--timeout", type=float, default=7200, help="seconds per subprocess")
    p.add_argument("--json", default=None, help="write machine info and every result here")
    p.add_argument("--quick", action="store_true", help="smoke run: vit_tiny_patch16_224, N=64, batch 16")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child is not None:
        res = run_child(json.loads(args.child))
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0

    model = args.model or ("vit_tiny_patch16_224" if args.quick else "vit_base_patch16_224")
    sizes_arg = args.sizes or ("64" if args.quick else "256")
    batch_size = args.batch_size or (16 if args.quick else 32)
    try:
        sizes = [int(s) for s in sizes_arg.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes must be a comma list of integers, not {sizes_arg!r}")
    if not sizes or min(sizes) < 1 or batch_size < 1:
        p.error("sizes and batch size must be positive")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = args.threads or cores
    cuda = args.device.startswith("cuda")
    if cuda:
        import torch

        if not torch.cuda.is_available():
            print("--device cuda requested but torch.cuda.is_available() is False", file=sys.stderr)
            return 2

    info = machine_info(args.device, threads)
    info.update(
        model=model, sizes=sizes, batch_size=batch_size, num_workers=args.num_workers,
        granularity=args.granularity, store_dtype=args.store_dtype,
    )
    print("# " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)

    results: list[dict[str, Any]] = []
    for n in sizes:
        data, gen_s = ensure_dataset(Path(args.data_dir) / str(n), n)
        if gen_s:
            print(f"  N={n}: generated {n} images in {data} ({gen_s:.0f} s)", flush=True)
        data_bytes = warm_page_cache(data)
        tmp = Path(tempfile.mkdtemp(prefix=f"vitdecomp-bench-store-{n}-", dir=args.store_dir))
        spec = {
            "n": n, "model": model, "data": str(data), "store": str(tmp / "store.zarr"),
            "batch_size": batch_size, "num_workers": args.num_workers, "granularity": args.granularity,
            "store_dtype": args.store_dtype, "threads": threads, "device": args.device, "sample_interval": 0.2,
        }
        t = time.perf_counter()
        try:
            r = launch(spec, args.timeout, script=__file__)
        finally:
            if args.keep_store:
                print(f"  N={n}: store kept at {tmp / 'store.zarr'}", flush=True)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        r.setdefault("n", n)
        r["data_dir"] = str(data)
        r["data_mib"] = data_bytes / 2**20
        r["subprocess_s"] = time.perf_counter() - t
        results.append(r)
        if "failed" in r:
            print(f"  N={n}: FAILED ({r['failed']})", flush=True)
        else:
            print(
                f"  N={n}: forward {r['forward_ips']:.1f} img/s, decompose_dataset {r['decompose_ips']:.1f} img/s "
                f"({r['time_ratio']:.2f}x), peak RSS {r['decompose_peak_rss_mib']:.0f} MiB "
                f"(+{r['decompose_rss_delta_mib']:.0f}), subprocess {r['subprocess_s']:.0f} s",
                flush=True,
            )
    print()
    print_table(results, cuda)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "results": results}, f, indent=2)
        print(f"\nwrote {args.json}")
    return 1 if any("failed" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
