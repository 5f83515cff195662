"""``vitdecomp models``: the model families vitdecomp can decompose and how to name them.

Lists :func:`vitdecomp.core.adapters.base.registered_adapters` and
:func:`vitdecomp.core.shipped.shipped_models` (one :meth:`~vitdecomp.core.shipped.ShippedModel.line` each)."""
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
    from ..core.shipped import shipped_models

    out = sys.stdout
    out.write("Supported model families:\n")
    for adapter in registered_adapters():
        out.write(f"  {adapter.family:<16} {adapter.description}\n")
    out.write("\n" + SPEC_HELP)
    out.write("\nShipped tiny models (trained on the synthetic world; held-out accuracy as recorded at training):\n")
    for model in shipped_models():
        out.write(f"  {model.line()}\n")
    return 0
