"""The README's quickstart runs as written; the command line works and fails cleanly."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fxprune.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_readme_quickstart_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_compile_prints_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", "torchvision:squeezenet1_1", "--ratio", "0.5", "--input-shape", "1,3,64,64"]) == 0
    out = capsys.readouterr().out
    assert "features.3.squeeze" in out and "total" in out and "verified" in out
    assert float(re.search(r"\(([\d.]+)% removed\)", out).group(1)) >= 50.0


def test_compile_markdown_and_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", "torchvision:resnet18", "--target-gflops", "0.1", "--input-shape", "1,3,64,64",
                 "--markdown", "--selector", "l1", "--no-verify"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| layer") and "not verified" in out


def test_inspect_prints_groups(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "torchvision:squeezenet1_1", "--input-shape", "1,3,64,64"]) == 0
    out = capsys.readouterr().out
    assert "prunable" in out and "features.3.expand3x3.weight[0]" in out


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["compile", "torchvision:nope", "--ratio", "0.5"], 1, "torchvision has no model 'nope'"),
        (["compile", "torchvision:resnet18", "--ratio", "2"], 1, "ratio must be in [0, 1)"),
        (["compile", "torchvision:resnet18", "--target-gflops", "1e-6", "--input-shape", "1,3,32,32"], 1, "out of reach"),
        (["inspect", "nomodule.at.all:factory"], 1, "cannot import"),
        (["inspect", "resnet18"], 1, "expected torchvision:NAME"),
        (["compile", "torchvision:resnet18"], 2, "one of the arguments --target-gflops --ratio is required"),
        (["inspect", "torchvision:resnet18", "--input-shape", "a,b"], 2, "comma-separated integers"),
    ],
)
def test_bad_arguments_exit_non_zero_with_one_line(argv: list[str], code: int, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) if code == 2 else contextlib.nullcontext():
        assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert message in err
    if code == 1:
        assert len(err.splitlines()) == 1 and err.startswith("fxprune: error:")


def test_console_script_and_module_entry_points() -> None:
    for cmd in (["fxprune"], [sys.executable, "-m", "fxprune"]):
        if cmd == ["fxprune"]:
            cmd = [str(Path(sys.executable).parent / "fxprune")]
        done = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "fxprune compile torchvision:resnet50 --target-gflops 2.0" in done.stdout
