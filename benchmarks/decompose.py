#!/usr/bin/env python
"""Time and peak memory of ``vitdecomp.decompose`` against a plain forward pass.

Method (docs/benchmarks.md has the figures and the discussion):

* **Memory** -- every (model, configuration) runs in a fresh subprocess (this script
  re-invoked with ``--child SPEC``): build the model (random weights) and the input, one
  warm-up call on a single image (kernels, thread pools, code pages), ``gc.collect()`` and
  ``malloc_trim(0)``; then the current RSS is the baseline, the kernel's peak-RSS counter is
  reset (``/proc/self/clear_refs``) and read (``VmHWM``, what ``ru_maxrss`` reports) after one
  full-batch call. On GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
* **Time** -- one subprocess per model calls every configuration ``--warmup`` times, then
  runs ``--repeats`` rounds; a round calls each configuration once (order rotated between
  rounds), timed with ``time.perf_counter`` (``torch.cuda.synchronize`` on GPU). A result is
  dropped before the next call. Ratios are paired within a round (median over rounds) and
  also given as min/min, the figure least disturbed by other processes on a shared machine.

Usage::

    python benchmarks/decompose.py                                  # ViT-B/16 + ViT-L/14, batch 8, CPU
    python benchmarks/decompose.py --device cuda --json gpu.json
    python benchmarks/decompose.py --quick                          # smoke run: tiny ViT, batch 2

See docs/benchmarks.md for the method and the recorded figures.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Any

# --------------------------------------------------------------------------- registry

MODELS: dict[str, tuple[str, str, str]] = {
    # key: (library, name, label)
    "vit_b16": ("timm", "vit_base_patch16_224", "ViT-B/16 (timm vit_base_patch16_224)"),
    "vit_l14": ("timm", "vit_large_patch14_clip_224", "ViT-L/14 (timm vit_large_patch14_clip_224)"),
    "openclip_b16": ("open_clip", "ViT-B-16", "ViT-B/16 (open_clip ViT-B-16 visual)"),
    "vit_tiny": ("timm", "vit_tiny_patch16_224", "ViT-Ti/16 (timm vit_tiny_patch16_224)"),
    "swin_b": ("timm", "swin_base_patch4_window7_224", "Swin-B (timm swin_base_patch4_window7_224)"),
    "maxvit_s": ("timm", "maxvit_small_tf_224", "MaxViT-S (timm maxvit_small_tf_224)"),
    "siglip_b16": ("timm", "vit_base_patch16_siglip_224", "SigLIP-B/16 (timm vit_base_patch16_siglip_224, MAP head)"),
}

# key: (decompose kwargs or None for the plain forward, description)
CONFIGS: dict[str, tuple[dict[str, Any] | None, str]] = {
    "forward": (None, "plain forward (model's own forward, no_grad)"),
    "layer": ({"granularity": "layer"}, "decompose granularity='layer'"),
    "head": ({"granularity": "head"}, "decompose granularity='head'"),
    "head_token_dirs": (
        {"granularity": "head_token", "directions": "K"},
        "decompose granularity='head_token', directions=K random unit vectors",
    ),
    "head_token_dirs_stream": (
        {"granularity": "head_token", "directions": "K", "stream": True},
        "vd.iter_decompose granularity='head_token', directions=K, each block's part reduced to a "
        "[batch, token, K] heatmap as it arrives (the whole result is never held)",
    ),
    "head_token_dirs_last2": (
        {"granularity": "head_token", "directions": "K", "start_layer": -2},
        "decompose granularity='head_token', directions=K, last 2 blocks only (Swin: its token grid is "
        "the last stage's)",
    ),
    "head_token_last4": (
        {"granularity": "head_token", "start_layer": -4},
        "decompose granularity='head_token', start_layer=-4, no directions",
    ),
    "neurons": (
        {"granularity": "head", "mlp_neurons": True},
        "decompose granularity='head', mlp_neurons=True, no directions",
    ),
    "neurons_dirs": (
        {"granularity": "head", "mlp_neurons": True, "directions": "K"},
        "decompose granularity='head', mlp_neurons=True, directions=K",
    ),
}

DEFAULT_MODELS = "vit_b16,vit_l14,openclip_b16"
DEFAULT_CONFIGS = ",".join(CONFIGS)
TARGETS = {  # from the issue: time ratio, and the memory ratio applies to every row
    "time": {"head": 1.3, "head_token_dirs": 2.0},
    "memory": 1.5,
}
RESULT_TAG = "BENCH_RESULT "

# --------------------------------------------------------------------------- memory helpers (Linux)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _rss_mib() -> float:
    kib = _status_kib("VmRSS")
    if kib is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return kib / 1024


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM / ru_maxrss); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    import resource

    kib = _status_kib("VmHWM")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


# --------------------------------------------------------------------------- child


def _build(model_key: str, device: str) -> tuple[Any, Any, Any, str]:
    """(module to forward, callable forward(x), vitdecomp Model or exception, note)."""
    import torch

    import vitdecomp as vd

    lib, name, _ = MODELS[model_key]
    torch.manual_seed(0)
    if lib == "timm":
        import timm

        module = timm.create_model(name, pretrained=False).eval().to(device)
        wrapped: Any
        try:
            wrapped = vd.wrap(module)
        except Exception as exc:  # noqa: BLE001
            wrapped = exc
        return module, module, wrapped, ""
    import open_clip

    clip = open_clip.create_model(name, pretrained=None).eval().to(device)
    errors = []
    for target, fwd in ((clip, clip.encode_image), (clip.visual, clip.visual)):
        try:
            return target, fwd, vd.wrap(target), f"wrapped {type(target).__name__}"
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{type(target).__name__}: {type(exc).__name__}: {exc}")
    return clip.visual, clip.visual, RuntimeError("; ".join(errors)), ""


def _setup(spec: dict[str, Any], configs: list[str]) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """Build the model and input; returns (facts, input batch, {config: callable or error})."""
    import torch

    import vitdecomp as vd

    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    facts: dict[str, Any] = {"model": spec["model"], "batch": spec["batch"]}
    t0 = time.perf_counter()
    module, forward, wrapped, note = _build(spec["model"], device)
    facts["build_s"] = time.perf_counter() - t0
    if note:
        facts["note"] = note
    facts["weights_mib"] = sum(p.numel() * p.element_size() for p in [*module.parameters(), *module.buffers()]) / 2**20
    facts["n_params"] = sum(p.numel() for p in module.parameters())
    if isinstance(wrapped, Exception):
        facts["skipped"] = f"vd.wrap failed: {type(wrapped).__name__}: {wrapped}"
        return facts, None, {}
    size = wrapped.preprocessing.input_size
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(spec["batch"], 3, *size, generator=gen).to(device)
    d_z = int(wrapped.representation(x[:1]).shape[-1])
    facts.update(d_z=d_z, input=[spec["batch"], 3, *size])
    g = torch.Generator().manual_seed(2)
    dirs = torch.randn(spec["directions"], d_z, generator=g)
    dirs = (dirs / dirs.norm(dim=-1, keepdim=True)).to(device)

    calls: dict[str, Any] = {}
    for config in configs:
        kwargs_spec, _ = CONFIGS[config]
        if kwargs_spec is None:

            def call(inp: Any) -> Any:
                with torch.no_grad():
                    return forward(inp)

        else:
            kwargs = dict(kwargs_spec, check=spec["check"])
            if kwargs.get("directions") == "K":
                kwargs["directions"] = dirs
            if kwargs.pop("stream", False):

                def call(inp: Any, kwargs: dict[str, Any] = kwargs) -> Any:
                    return _streamed_heatmap(vd.iter_decompose(wrapped, inp, **kwargs))

            else:

                def call(inp: Any, kwargs: dict[str, Any] = kwargs) -> Any:
                    return vd.decompose(wrapped, inp, **kwargs)

        calls[config] = call
    return facts, x, calls


class _Heatmap:
    """What a streaming consumer keeps: the per-token sum over components ``[1, batch, token, K]``."""

    def __init__(self, values: Any, reference: Any) -> None:
        self.values, self.reference = values, reference

    def error(self) -> float:
        total = self.values[0].double().sum(1)
        ref = self.reference.double()
        return float(((total - ref).norm(dim=-1) / ref.norm(dim=-1)).max())


def _streamed_heatmap(parts: Any) -> _Heatmap:
    heat = None
    reference = None
    for part in parts:
        s = part.values.sum(0)
        heat = s if heat is None else heat.add_(s)
        reference = part.reference
        del part, s
    return _Heatmap(heat[None], reference)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def run_memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one full-batch call of one configuration, in a fresh process."""
    import torch

    config, device = spec["config"], spec["device"]
    facts, x, calls = _setup(spec, [config])
    out = {**facts, "config": config}
    if "skipped" in facts:
        return out
    call = calls[config]
    # 1-image warm-up (kernels, thread pools, code pages), then drop what it left behind
    res = call(x[:1])
    _sync(device)
    del res
    _trim()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    base_rss = _rss_mib()
    out["peak_reset"] = _reset_peak_rss()
    t = time.perf_counter()
    res = call(x)
    _sync(device)
    out["first_call_s"] = time.perf_counter() - t
    out["rss_baseline_mib"] = base_rss
    out["rss_peak_mib"] = _peak_rss_mib()
    out["rss_delta_mib"] = max(out["rss_peak_mib"] - base_rss, 0.0)
    if cuda:
        out["cuda_baseline_mib"] = base
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_delta_mib"] = out["cuda_peak_mib"] - base
    if CONFIGS[config][0] is not None:
        out["output_mib"] = res.values.numel() * res.values.element_size() / 2**20
        out["output_shape"] = list(res.values.shape)
        out["error"] = res.error()
    else:
        out["output_shape"] = list(res.shape)
    return out


def run_time_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Time every configuration of one model in one process, interleaved round by round.

    Each round calls every configuration once (the order rotates between rounds), so a
    slow-down of the machine (other processes, frequency changes) hits the forward pass and
    the decompositions alike; ratios are taken within a round.
    """
    configs, device = spec["configs"], spec["device"]
    facts, x, calls = _setup(spec, configs)
    out: dict[str, Any] = {**facts, "times": {}, "failed": {}}
    if "skipped" in facts:
        return out
    load0 = os.getloadavg()[0]
    live = []
    for config in configs:
        try:
            for _ in range(max(spec["warmup"], 1)):
                res = calls[config](x)
                _sync(device)
                del res
            live.append(config)
        except Exception as exc:  # noqa: BLE001
            out["failed"][config] = f"{type(exc).__name__}: {exc}"
    times: dict[str, list[float]] = {c: [] for c in live}
    for rnd in range(spec["repeats"]):
        order = live[rnd % len(live) :] + live[: rnd % len(live)]
        for config in order:
            t = time.perf_counter()
            res = calls[config](x)
            _sync(device)
            times[config].append(time.perf_counter() - t)
            del res
    out["times"] = times
    out["loadavg_1min"] = [load0, os.getloadavg()[0]]
    return out


# --------------------------------------------------------------------------- parent


def run_profile(spec: dict[str, Any], config: str, top: int) -> None:
    """torch.profiler on one full-batch call of ``config``: where the time and memory go."""
    from torch.profiler import ProfilerActivity, profile

    device = spec["device"]
    facts, x, calls = _setup(spec, [config])
    if "skipped" in facts:
        print(f"skipped: {facts['skipped']}")
        return
    call = calls[config]
    for _ in range(max(spec["warmup"], 1)):
        res = call(x)
        _sync(device)
        del res
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    t = time.perf_counter()
    with profile(activities=acts, record_shapes=True, profile_memory=True, with_stack=True) as prof:
        res = call(x)
        _sync(device)
    wall = time.perf_counter() - t
    del res
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    print(f"# {spec['model']} {config}, batch {spec['batch']}, {spec['threads']} threads: {wall:.3f} s under the profiler")
    print(prof.key_averages().table(sort_by=sort, row_limit=top))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=top))
    # attribute every top-level op (with its nested ops) to the innermost vitdecomp source line
    # on its Python stack (else the innermost frame outside torch)
    def is_py(ev: Any) -> bool:
        return ev.name.startswith("<built-in") or bool(re.match(r"^.+\(\d+\): ", ev.name))

    def alloc(ev: Any) -> int:
        return max(ev.cpu_memory_usage, 0) + sum(alloc(c) for c in ev.cpu_children if not is_py(c))

    by_line: dict[str, list[float]] = {}
    for ev in prof.events():
        if is_py(ev) or ev.name.startswith("ProfilerStep"):
            continue
        chain, parent, nested = [], ev.cpu_parent, False
        while parent is not None:
            if not is_py(parent):
                nested = True
                break
            chain.append(parent.name)
            parent = parent.cpu_parent
        if nested or not chain:
            continue
        where = next((f for f in chain if "vitdecomp" in f), None)
        where = where or next((f for f in chain if "torch/" not in f and "<built-in" not in f), chain[0])
        acc = by_line.setdefault(where, [0.0, 0.0, 0])
        acc[0] += ev.cpu_time_total
        acc[1] += alloc(ev)
        acc[2] += 1
    total = sum(v[0] for v in by_line.values()) or 1.0
    print(f"{'CPU ms':>9} {'share':>6} {'alloc MiB':>10} {'ops':>6}  innermost vitdecomp function (its def line) of each top-level op")
    for line, (us, mem, n) in sorted(by_line.items(), key=lambda kv: -kv[1][0])[:top]:
        line = re.sub(r"^.*?/(vitdecomp|timm|open_clip)/", r"\1/", line)
        print(f"{us / 1e3:9.1f} {us / total:6.1%} {mem / 2**20:10.1f} {n:6d}  {line}")


def machine_info(device: str, threads: int) -> dict[str, Any]:
    import timm
    import torch

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if m:
            cpu = m.group(1).strip()
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"^MemTotal:\s+(\d+)", f.read(), re.M)
        mem = round(int(m.group(1)) / 2**20, 1) if m else None
    except OSError:
        pass
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": threads,
        "ram_gib": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "device": device,
    }
    try:
        import open_clip

        info["open_clip"] = open_clip.__version__
    except Exception:  # noqa: BLE001
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def launch(spec: dict[str, Any], timeout: float, script: str = __file__) -> dict[str, Any]:
    """Run ``script`` (default this one) with ``--child SPEC``; its result, or ``{"failed": why}``."""
    cmd = [sys.executable, os.path.abspath(script), "--child", json.dumps(spec)]
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception)\b", ln)]
    why = errors[-1] if errors else " | ".join(lines[-3:])
    return {"failed": f"exit {proc.returncode}: {why}"}


def merge_times(results: list[dict[str, Any]], timing: dict[str, Any]) -> None:
    """Attach the timing child's figures to the per-configuration rows of one model."""
    times = timing.get("times", {})
    fwd = times.get("forward")
    for r in results:
        c = r["config"]
        if c in timing.get("failed", {}) and "failed" not in r:
            r["failed"] = timing["failed"][c]
        t = times.get(c)
        if not t:
            continue
        r["times_s"] = t
        r["median_s"] = statistics.median(t)
        r["min_s"] = min(t)
        if fwd:
            # paired: this configuration's time over the forward's time in the same round
            r["time_ratio"] = statistics.median(a / b for a, b in zip(t, fwd))
            r["time_ratio_min"] = min(t) / min(fwd)
    for r in results:
        r["loadavg_1min"] = timing.get("loadavg_1min")


def add_memory_ratios(results: list[dict[str, Any]], cuda: bool) -> None:
    f = next((r for r in results if r["config"] == "forward" and "rss_peak_mib" in r), None)
    if f is None:
        return
    for r in results:
        if "rss_peak_mib" not in r:
            continue
        if cuda:
            r["mem_ratio_total"] = r["cuda_peak_mib"] / f["cuda_peak_mib"]
            r["mem_ratio_delta"] = r["cuda_delta_mib"] / max(f["cuda_delta_mib"], 1e-9)
        else:
            # weights + working memory (the interpreter and the torch libraries left out)
            r["model_peak_mib"] = r["weights_mib"] + r["rss_delta_mib"]
            r["mem_ratio_total"] = r["model_peak_mib"] / (f["weights_mib"] + f["rss_delta_mib"])
            r["mem_ratio_delta"] = r["rss_delta_mib"] / max(f["rss_delta_mib"], 1e-9)
            r["mem_ratio_process"] = r["rss_peak_mib"] / f["rss_peak_mib"]


def add_targets(results: list[dict[str, Any]]) -> None:
    for r in results:
        tgt = TARGETS["time"].get(r["config"])
        if tgt is not None and "time_ratio" in r:
            r["time_target"] = tgt
            r["time_target_met"] = r["time_ratio"] <= tgt
        if r["config"] != "forward" and "mem_ratio_total" in r:
            r["mem_target_met"] = r["mem_ratio_total"] <= TARGETS["memory"]


def _fmt(v: Any, spec: str, width: int) -> str:
    return f"{v:{width}{spec}}" if isinstance(v, (int, float)) and not isinstance(v, bool) else f"{'-':>{width}}"


def print_table(results: list[dict[str, Any]], cuda: bool) -> None:
    mem = "GPU" if cuda else "RSS"
    hdr = (
        f"{'model':<13} {'config':<17} {'median s':>9} {'min s':>8} {'x fwd':>6} {'xfwd(min)':>9} "
        f"{'weights':>8} {'d' + mem:>8} {'x fwd':>7} {'total':>8} {'x fwd':>6} {'output':>8} {'rel err':>8}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        head = f"{r['model']:<13} {r['config']:<17}"
        if "skipped" in r or "failed" in r:
            print(f"{head} {'SKIPPED' if 'skipped' in r else 'FAILED'}: {r.get('skipped') or r.get('failed')}")
            continue
        delta = r.get("cuda_delta_mib") if cuda else r.get("rss_delta_mib")
        total = r.get("cuda_peak_mib") if cuda else r.get("model_peak_mib")
        print(
            f"{head} {_fmt(r.get('median_s'), '.3f', 9)} {_fmt(r.get('min_s'), '.3f', 8)} "
            f"{_fmt(r.get('time_ratio'), '.2f', 6)} {_fmt(r.get('time_ratio_min'), '.2f', 9)} "
            f"{_fmt(r.get('weights_mib'), '.0f', 8)} {_fmt(delta, '.0f', 8)} {_fmt(r.get('mem_ratio_delta'), '.2f', 7)} "
            f"{_fmt(total, '.0f', 8)} {_fmt(r.get('mem_ratio_total'), '.2f', 6)} "
            f"{_fmt(r.get('output_mib'), '.0f', 8)} {_fmt(r.get('error'), '.1e', 8)}"
        )
    print()
    print("Times: median of the timed calls; x fwd = median over rounds of (time / forward time in the same round).")
    print(f"Memory (MiB): d{mem} = peak above the baseline after building the model and input;")
    print("total = weights + that increase" + (" (GPU: peak allocated)" if cuda else "") + "; output = the returned values tensor.")
    print("Targets (issue): head <= 1.3x forward time; head_token with directions <= 2x; peak memory <= 1.5x.")
    for r in results:
        if "time_target" in r:
            ok = "met" if r["time_target_met"] else "MISSED"
            print(f"  {r['model']:<13} {r['config']:<17} time   {r['time_ratio']:6.2f}x (target {r['time_target']}x): {ok}")
        if "mem_target_met" in r and r["config"] in TARGETS["time"]:
            ok = "met" if r["mem_target_met"] else "MISSED"
            print(f"  {r['model']:<13} {r['config']:<17} memory {r['mem_ratio_total']:6.2f}x (target 1.5x): {ok}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help=f"comma list of {sorted(MODELS)} (default {DEFAULT_MODELS})")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma list of {list(CONFIGS)}")
    p.add_argument("--batch", type=int, default=None, help="images per batch (default 8)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per model (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed full-batch calls per configuration (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    p.add_argument("--directions", type=int, default=1000, help="number of random unit directions (default 1000)")
    p.add_argument("--no-check", action="store_true", help="decompose(check=False) (default: check=True, as users call it)")
    p.add_argument("--skip-memory", action="store_true", help="time only")
    p.add_argument("--skip-time", action="store_true", help="memory only")
    p.add_argument("--timeout", type=float, default=7200, help="seconds per subprocess")
    p.add_argument("--json", default=None, help="write machine info and every result here")
    p.add_argument("--quick", action="store_true", help="smoke run: vit_tiny, batch 2, 2 rounds")
    p.add_argument("--profile", default=None, metavar="CONFIG", help="profile one call of CONFIG (first model) and exit")
    p.add_argument("--top", type=int, default=25, help="rows of the --profile tables")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child is not None:
        spec = json.loads(args.child)
        res = run_time_child(spec) if spec["mode"] == "time" else run_memory_child(spec)
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0

    if args.quick:
        models = args.models or "vit_tiny"
        batch, repeats = args.batch or 2, args.repeats or 2
    else:
        models = args.models or DEFAULT_MODELS
        batch, repeats = args.batch or 8, args.repeats or 5
    warmup = args.warmup if args.warmup is not None else 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = args.threads or cores
    cuda = args.device.startswith("cuda")
    if cuda:
        import torch

        if not torch.cuda.is_available():
            print("--device cuda requested but torch.cuda.is_available() is False", file=sys.stderr)
            return 2
    model_keys = [m.strip() for m in models.split(",") if m.strip()]
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for k in model_keys:
        if k not in MODELS:
            p.error(f"unknown model {k!r}; choose from {sorted(MODELS)}")
    for c in configs:
        if c not in CONFIGS:
            p.error(f"unknown config {c!r}; choose from {list(CONFIGS)}")
    if "forward" not in configs:
        configs.insert(0, "forward")  # every ratio needs it

    if args.profile is not None:
        if args.profile not in CONFIGS:
            p.error(f"unknown config {args.profile!r}; choose from {list(CONFIGS)}")
        spec = {
            "model": model_keys[0], "batch": batch, "device": args.device, "threads": threads, "warmup": warmup,
            "directions": args.directions, "check": not args.no_check,
        }
        run_profile(spec, args.profile, args.top)
        return 0

    info = machine_info(args.device, threads)
    info.update(batch=batch, repeats=repeats, warmup=warmup, directions=args.directions, check=not args.no_check)
    print("# " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    base = {
        "batch": batch,
        "device": args.device,
        "threads": threads,
        "repeats": repeats,
        "warmup": warmup,
        "directions": args.directions,
        "check": not args.no_check,
    }
    all_results: list[dict[str, Any]] = []
    for mk in model_keys:
        rows = [{"model": mk, "config": c} for c in configs]
        if not args.skip_memory:
            for row in rows:
                t = time.perf_counter()
                r = launch({**base, "mode": "memory", "model": mk, "config": row["config"]}, args.timeout)
                row.update(r)
                if "skipped" in r:
                    print(f"  note: {mk}: skipped ({r['skipped']})", flush=True)
                    break
                if "failed" in r:
                    print(f"  {mk:<13} {row['config']:<17} memory: FAILED ({r['failed']})", flush=True)
                else:
                    delta = r.get("cuda_delta_mib", r["rss_delta_mib"])
                    print(
                        f"  {mk:<13} {row['config']:<17} memory: +{delta:.0f} MiB "
                        f"(one call {r['first_call_s']:.2f} s, subprocess {time.perf_counter() - t:.0f} s)",
                        flush=True,
                    )
        if any("skipped" in r for r in rows):
            all_results.extend(r for r in rows if "skipped" in r)
            continue
        if not args.skip_time:
            live = [r["config"] for r in rows if "failed" not in r]
            t = time.perf_counter()
            timing = launch({**base, "mode": "time", "model": mk, "configs": live}, args.timeout)
            if "skipped" in timing:
                print(f"  note: {mk}: skipped ({timing['skipped']})", flush=True)
                all_results.append({"model": mk, "config": "forward", "skipped": timing["skipped"]})
                continue
            if "times" not in timing:
                print(f"  {mk}: timing FAILED ({timing.get('failed')})", flush=True)
            else:
                merge_times(rows, timing)
                for r in rows:
                    if "median_s" in r:
                        print(f"  {mk:<13} {r['config']:<17} time: median {r['median_s']:.3f} s", flush=True)
                print(f"  ({mk} timing subprocess {time.perf_counter() - t:.0f} s)", flush=True)
                for r in rows:
                    for k in ("weights_mib", "n_params", "d_z", "input", "note"):
                        if k in timing and k not in r:
                            r[k] = timing[k]
        add_memory_ratios(rows, cuda)
        all_results.extend(rows)
    add_targets(all_results)
    print()
    print_table(all_results, cuda)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "results": all_results}, f, indent=2)
        print(f"\nwrote {args.json}")
    return 1 if any("failed" in r for r in all_results) else 0


if __name__ == "__main__":
    sys.exit(main())
