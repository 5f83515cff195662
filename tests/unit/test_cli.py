"""CLI plumbing that needs no model."""
from __future__ import annotations

import subprocess
import sys

import pytest

from vitdecomp.cli.main import EXIT_INPUT, main


def test_help_does_not_import_torch():
    code = "import sys; import vitdecomp.cli.main as m; m.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    helped = subprocess.run([sys.executable, "-m", "vitdecomp", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "decompose" in helped.stdout and "models" in helped.stdout


def test_version_and_no_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and "vitdecomp" in capsys.readouterr().out
    assert main([]) == EXIT_INPUT


def test_models_lists_every_family(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for family in ("timm-vit", "open_clip-vit", "timm-swin", "timm-maxvit"):
        assert family in out
    assert "open_clip:ARCH[:TAG]" in out
