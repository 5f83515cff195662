"""``vitdecomp models``: the model families vitdecomp can decompose and how to name them."""
from __future__ import annotations

import argparse
import sys
from typing import Any

SPEC_HELP = """\
Model specs:
  timm:NAME                 e.g. timm:deit_small_patch16_224, timm:vit_small_patch14_reg4_dinov2
  open_clip:ARCH[:TAG]      e.g. open_clip:ViT-B-16:laion2b_s34b_b88k
  hf:REPO_OR_LOCAL_PATH     e.g. hf:openai/clip-vit-base-patch16, hf:./my_saved_model
  synth:KIND                a tiny model shipped with vitdecomp (offline; listed below), or
  synth:FOLDER              one you trained with `vitdecomp synth train KIND --out FOLDER`
Add --no-pretrained for random weights (offline) or --checkpoint FILE for local weights.
"""


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("models", parents=parents, help="list supported model families", description=SPEC_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..core.adapters.base import registered_adapters

    out = sys.stdout
    out.write("Supported model families:\n")
    for adapter in registered_adapters():
        out.write(f"  {adapter.family:<16} {adapter.description}\n")
    out.write("\n" + SPEC_HELP)
    out.write("\nShipped tiny models (trained on the synthetic world; held-out accuracy as recorded at training):\n")
    for line in shipped_model_lines():
        out.write(f"  {line}\n")
    return 0


def shipped_model_lines() -> list[str]:
    """One line per shipped tiny model: its spec, what it was trained for and its recorded accuracy."""
    import json

    from ..core.shipped import SHIPPED, shipped_path

    lines = []
    for kind, what in SHIPPED.items():
        info = json.loads((shipped_path(kind) / "tiny_model.json").read_text(encoding="utf-8"))
        zero_shot = info.get("zero_shot_accuracy")
        if zero_shot:
            acc = "zero-shot " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(zero_shot.items()))
        else:
            acc = f"{info.get('task', '?')} {info.get('accuracy', float('nan')):.2f}"
            worst = (info.get("eval") or {}).get("worst_group_accuracy")
            if worst is not None:
                acc += f" (worst group {worst:.2f})"
        lines.append(f"synth:{kind:<9} {what}; {acc}")
    return lines
