"""``vitdecomp decompose MODEL IMAGE_OR_DIR...``: decompose images and show the top components."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

SHOW_PER_IMAGE = 4


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "decompose",
        parents=parents,
        help="decompose images into component contributions",
        description=(
            "Run MODEL on the images, split each representation exactly into component "
            "contributions, print the largest ones (and, for a classifier, their contributions "
            "to the predicted class logit) and optionally save the stack."
        ),
    )
    p.add_argument("model", help="timm:NAME | open_clip:ARCH[:TAG] | hf:REPO_OR_PATH (see `vitdecomp models`)")
    p.add_argument("inputs", nargs="+", help="image files or directories (searched recursively)")
    p.add_argument("--granularity", choices=("layer", "head", "head_token"), default="head")
    p.add_argument("--start-layer", type=int, default=0, help="first decomposed block; earlier ones form 'rest'")
    p.add_argument("--top", type=int, default=10, help="components to show (default 10)")
    p.add_argument("--out", type=Path, help="save the stack here (.safetensors; read with ComponentStack.load)")
    p.add_argument("--no-pretrained", action="store_true", help="random weights (offline; for trying things out)")
    p.add_argument("--checkpoint", type=Path, help="load weights from a local .safetensors / torch file")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--ln-mode", choices=("centered", "anchor"), default="centered")
    p.add_argument("--bias-mode", choices=("explicit", "anchor", "split"), default="explicit")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    import vitdecomp as vd

    from ..data.images import find_images, iter_image_batches
    from ..errors import InputError

    paths = find_images(args.inputs)
    if not paths:
        raise InputError(f"no image files found in {' '.join(args.inputs)}")
    model = vd.load(args.model, pretrained=not args.no_pretrained, checkpoint=args.checkpoint, device=args.device)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    stacks, used, skipped = [], [], {}
    batches = iter_image_batches(paths, model.transform, args.batch_size)
    n_batches = -(-len(paths) // args.batch_size)
    for batch in tqdm(batches, total=n_batches, desc="decompose", unit="batch", disable=n_batches < 2 or args.json):
        skipped.update(batch.skipped)
        if batch.pixels is None:
            continue
        stacks.append(
            vd.decompose(
                model, batch.pixels, granularity=args.granularity, start_layer=args.start_layer,
                ln_mode=args.ln_mode, bias_mode=args.bias_mode, dtype=dtype,
            ).to("cpu")
        )
        used.extend(batch.paths)
    if not stacks:
        raise InputError(f"none of the {len(paths)} images could be read: {skipped}")
    stack = stacks[0] if len(stacks) == 1 else replace(
        stacks[0],
        values=torch.cat([s.values for s in stacks], dim=1),
        reference=torch.cat([s.reference for s in stacks], dim=0),
    )
    stack = replace(stack, meta={**stack.meta, "images": [str(p) for p in used], "skipped": skipped})
    report = _report(model, stack, args.top)
    report.update(images=[str(p) for p in used], skipped=skipped)
    if args.out is not None:
        report["saved"] = str(stack.save(args.out))
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        sys.stdout.write(_format(report))
    return 0


def _report(model: Any, stack: Any, top: int) -> dict[str, Any]:
    """Top components per image (few images) or on average (many), as plain data."""
    import torch

    summed = stack.sum_tokens()
    ref = summed.reference.double()
    values = summed.values.double()  # [comp, batch, d]
    share = torch.einsum("cbd,bd->cb", values, ref) / ref.pow(2).sum(-1)  # sums to 1 over components
    norms = values.norm(dim=-1)
    report: dict[str, Any] = {
        "model": model.name,
        "weights": model.weights,
        "granularity": stack.meta.get("granularity"),
        "components": len(stack),
        "error": stack.error(),
        "tolerance": float(stack.meta.get("rtol", 1e-5)),
    }
    classifier = model.classifier()
    per_image = stack.batch_size <= SHOW_PER_IMAGE
    rows = []
    columns = range(stack.batch_size) if per_image else [None]
    for b in columns:
        n = norms[:, b] if b is not None else norms.mean(1)
        s = share[:, b] if b is not None else share.mean(1)
        order = torch.argsort(n, descending=True)[:top]
        entry: dict[str, Any] = {
            "image": None if b is None else b,
            "top": [{"component": stack.names[i], "norm": float(n[i]), "share": float(s[i])} for i in order],
        }
        if classifier is not None and b is not None:
            weight, bias = (t.detach() if t is not None else None for t in classifier)
            logits = ref[b] @ weight.double().T + (bias.double() if bias is not None else 0.0)
            pred = int(logits.argmax())
            contrib = values[:, b] @ weight[pred].double()
            best = torch.argsort(contrib.abs(), descending=True)[:top]
            entry["predicted_class"] = pred
            entry["logit"] = float(logits[pred])
            entry["logit_top"] = [{"component": stack.names[i], "contribution": float(contrib[i])} for i in best]
        rows.append(entry)
    report["rows"] = rows
    return report


def _format(report: dict[str, Any]) -> str:
    lines = [f"model {report['model']} ({report['weights']}), {report['components']} components"]
    if report["weights"] == "random-init":
        lines.append("note: random weights (--no-pretrained): the numbers show the mechanics, not meaning")
    for row in report["rows"]:
        image = report["images"][row["image"]] if row["image"] is not None else f"mean over {len(report['images'])} images"
        lines.append(f"\n{image}")
        lines.append(f"  {'component':<14} {'|c|':>10} {'share of z':>11}")
        for item in row["top"]:
            lines.append(f"  {item['component']:<14} {item['norm']:>10.4f} {item['share']:>11.1%}")
        if "predicted_class" in row:
            lines.append(f"  predicted class {row['predicted_class']} (logit {row['logit']:.3f}); contributions:")
            for item in row["logit_top"]:
                lines.append(f"    {item['component']:<14} {item['contribution']:>+10.4f}")
    if report["skipped"]:
        lines.append(f"\nskipped {len(report['skipped'])} file(s):")
        lines.extend(f"  {path}: {reason}" for path, reason in report["skipped"].items())
    lines.append(
        f"\nΣ components = model output: max rel. error {report['error']:.1e} (tolerance {report['tolerance']:.0e})"
    )
    if "saved" in report:
        lines.append(f"stack saved to {report['saved']}")
    return "\n".join(lines) + "\n"
