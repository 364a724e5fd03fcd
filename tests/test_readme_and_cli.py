"""The README's snippets run as written and print what they say; the command line works and fails cleanly."""

from __future__ import annotations

import ast
import builtins
import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FlopClock
from fxprune.cli import main

ROOT = Path(__file__).resolve().parent.parent


# A comment after a print that starts with printed values (True, 3, torch.Size([1, 1000]), several
# separated by spaces; then the end or ": why") promises exactly that output line.
VALUE = r"True|False|None|-?\d+(?:\.\d+)?|torch\.Size\(\[[\d, ]*\]\)"
PROMISE = re.compile(rf"#\s*((?:{VALUE})(?: (?:{VALUE}))*)\s*(?::|$)")
# Prints whose comment describes a table: the columns or words the table must show (its numbers vary).
TABLES = {
    "print(fxprune.report(small))": ["layer", "params", "MACs", "FLOPs", "->", "total"],
    "print(graph)": ["channels", "members", "prunable", "frozen: model input x"],
    "print(fxprune.report(fast).summary())": ["FLOPs", "params", "latency", "faster", "batch 1", "threads"],
    "print(fxprune.measure_latency(fast, x))": ["ms median", "IQR", "batch 1", "cpu", "threads"],
    "print(type(pruned).__name__, pruned.config.num_attention_heads, pruned.config.intermediate_size)": ["LlamaForCausalLM"],
    "print(history)": ["step", "GFLOPs", "params", "metric", "ranking s", "selecting s", "rewriting s", "fine-tuning s"],
}


def run_printing(code: str) -> dict[int, str]:
    """Run ``code``; what each of its print calls wrote to stdout, by the line the call is on."""
    printed: dict[int, str] = {}

    def print_(*args: object, sep: str | None = " ", end: str | None = "\n", file=None, flush: bool = False) -> None:
        out = io.StringIO()
        builtins.print(*args, sep=sep, end=end, file=out)
        line = sys._getframe(1).f_lineno
        printed[line] = printed.get(line, "") + out.getvalue()
        builtins.print(out.getvalue(), end="", file=file, flush=flush)

    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, "README.md", "exec"), {"print": print_})
    return printed


def test_readme_snippets_print_what_they_say(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every snippet as written; the clock of whole-model timings is a deterministic stand-in (as the
    layer clock is, tests/conftest.py), so a busy test machine cannot change what the latency target does."""
    monkeypatch.chdir(tmp_path)  # the examples write files
    monkeypatch.setattr("fxprune.latency.timing.time_calls", FlopClock())
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks
    promised = 0
    for code in blocks:
        printed = run_printing(code)
        lines = code.splitlines()
        for call in ast.walk(ast.parse(code)):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "print"):
                continue
            source = ast.get_source_segment(code, call)
            out = "".join(printed.get(n, "") for n in range(call.lineno, call.end_lineno + 1))
            assert out, f"{source} printed nothing"
            comment = lines[call.end_lineno - 1][call.end_col_offset:].strip()
            if source in TABLES:
                missing = [word for word in TABLES[source] if word not in out]
                assert not missing, f"{source} printed no {missing}:\n{out}"
            elif comment:
                promise = PROMISE.match(comment)
                assert promise, f"README: say in TABLES what {source} ({comment}) must print"
                assert out.rstrip("\n") == promise.group(1), f"{source} printed {out!r}, the README says {promise.group(1)!r}"
                promised += 1
    assert promised >= 3  # torch.Size([1, 1000]); True; torch.Size([1, 1000]) True


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


def test_compile_strategy_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", "torchvision:resnet18", "--ratio", "0.5", "--input-shape", "1,3,64,64", "--mode", "global",
                 "--selector", "l1", "--round-to", "8", "--min-width", "16", "--keep-classes", "1,5,9"]) == 0
    out = capsys.readouterr().out
    fc = next(line for line in out.splitlines() if line.startswith("fc "))
    assert re.search(r"512( -> \d+)?\s+1000 -> 3\b", fc), fc  # the report starts from the 1000-class model
    widths = [int(m) for m in re.findall(r"Conv2d\s+\d+ -> \d+\s+\d+ -> (\d+)", out)]
    assert widths and all(w % 8 == 0 and w >= 16 for w in widths)


def test_inspect_prints_groups(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "torchvision:squeezenet1_1", "--input-shape", "1,3,64,64"]) == 0
    out = capsys.readouterr().out
    assert "prunable" in out and "features.3.expand3x3.weight[0]" in out


def test_inspect_draws_and_compile_writes_report_dir_and_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dot, png, out, saved = tmp_path / "g.dot", tmp_path / "g.png", tmp_path / "out", tmp_path / "s.pt2"
    assert main(["inspect", "torchvision:squeezenet1_1", "--input-shape", "1,3,64,64", "--dot", str(dot), "--png", str(png)]) == 0
    text = dot.read_text()
    assert text.startswith("graph fxprune {") and "frozen: model input x" in text and text.count("--") > 20
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["--quiet", "compile", "torchvision:squeezenet1_1", "--ratio", "0.5", "--input-shape", "1,3,64,64",
                 "--report-dir", str(out), "--save", str(saved)]) == 0
    assert json.loads((out / "report.json").read_text())["macs"][1] > 0
    assert (out / "report.md").read_text().startswith("| layer")
    assert (out / "widths.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["compile", "torchvision:squeezenet1_1", "--ratio", "0.5", "--input-shape", "1,3,64,64", "--report-dir", str(out)]) == 0
    assert capsys.readouterr().err.count("captured") == 1  # announced once, though the report's picture analyzes the model again
    assert main(["report", str(saved)]) == 0
    assert "features.3.squeeze" in capsys.readouterr().out
    assert main(["inspect", str(saved), "--input-shape", "1,3,64,64"]) == 0  # a saved model is a MODEL too
    assert "prunable" in capsys.readouterr().out


def test_timm_models_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--quiet", "compile", "timm:resnet18", "--ratio", "0.4", "--input-shape", "1,3,64,64"]) == 0
    assert "layer1.0.conv1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["compile", "torchvision:nope", "--ratio", "0.5"], 1, "torchvision has no model 'nope'"),
        (["compile", "torchvision:resnet18", "--ratio", "2"], 2, "ratio must be in [0, 1)"),
        (["compile", "torchvision:resnet18", "--ratio", "1.5"], 2, "ratio must be in [0, 1)"),
        (["compile", "torchvision:resnet18", "--target-gflops", "1e-6", "--input-shape", "1,3,32,32"], 1, "out of reach"),
        (["compile", "torchvision:resnet18", "--speedup", "0.5"], 2, "speedup must be at least 1"),
        (["compile", "torchvision:resnet18", "--round-to", "x"], 2, "expected an integer or auto, got 'x'"),
        (["compile", "torchvision:resnt18", "--ratio", "0.5"], 1, "did you mean torchvision:resnet18"),
        (["compile", "torchvision:resnet18", "--ratio", "1.5", "--weights", "missing.pt"], 2, "ratio must be in [0, 1)"),  # before building
        (["inspect", "torchvision:resnet18", "--weights", "missing.pt"], 1, "--weights missing.pt: no such file"),
        (["inspect", "torchvision:resnet18", "--model-arg", "num_classes"], 2, "expected KEY=VALUE"),
        (["inspect", "nomodule.at.all:factory"], 1, "cannot import"),
        (["inspect", "resnet18"], 1, "expected torchvision:NAME"),
        (["inspect", "timm:no_such_net"], 1, "timm has no model 'no_such_net'"),
        (["report", "missing.pt2"], 1, "missing.pt2"),
        (["inspect", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--png", "x.gif"], 1, "cannot draw to x.gif"),
        (["compile", "torchvision:resnet18"], 2, "one of the arguments --target-gflops --ratio --speedup --target-latency-ms is required"),
        (["inspect", "torchvision:resnet18", "--input-shape", "a,b"], 2, "comma-separated integers"),
    ],
)
def test_bad_arguments_exit_non_zero_with_the_message(argv: list[str], code: int, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) if code == 2 else contextlib.nullcontext():
        assert main(["--quiet", *argv]) == code
    err = capsys.readouterr().err.strip()
    assert message in err
    if code == 1:
        assert "fxprune: error:" in err and "Traceback" not in err


def test_cli_prunes_a_trained_checkpoint_as_python_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    import torchvision

    import fxprune

    torch.manual_seed(0)
    trained = torchvision.models.resnet18(num_classes=10)
    torch.save(trained.state_dict(), tmp_path / "ckpt.pt")
    saved, rep = tmp_path / "small.pt2", tmp_path / "rep"
    assert main(["compile", "torchvision:resnet18", "--weights", str(tmp_path / "ckpt.pt"), "--model-arg", "num_classes=10",
                 "--input-shape", "3,64,64", "--ratio", "0.5", "--save", str(saved), "--report-dir", str(rep), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "random weights" not in err and (rep / "report.json").is_file()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    in_python = fxprune.compile(trained.eval(), ratio=0.5, example_inputs=x)
    from_cli = fxprune.load(saved)
    probe = torch.randn(1, 3, 64, 64)  # the saved program was exported at batch 1
    torch.testing.assert_close(from_cli(probe), in_python(probe), rtol=1e-4, atol=1e-4)
    assert from_cli.meta["fxprune"]["plan"] == in_python.meta["fxprune"]["plan"]
    assert main(["inspect", "torchvision:resnet18", "--weights", str(tmp_path / "ckpt.pt"), "--input-shape", "3,32,32"]) == 1
    assert "--model-arg num_classes=10" in capsys.readouterr().err  # the checkpoint has 10 classes, the default model 1000


def test_cli_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("fxprune 0.1.0")
    assert main(["compile", "torchvision:resnet18", "--ratio", "0.3", "--input-shape", "1,3,32,32", "--keep-classes", "7,3", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "random weights" in err and "building" not in err  # --quiet after the command; the warning still shows
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mynets.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def net(width=8):\n    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(width * 16 * 16, 4))\n"
        "class Branchy(nn.Module):\n    def forward(self, x):\n        return x if x.sum() > 1e9 else x.view(5, -1)\n"
        "def branchy():\n    return Branchy()\n")
    assert main(["compile", "mynets:net", "--model-arg", "width=6", "--ratio", "0.3", "--input-shape", "3,16,16", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["compile", "mynets:net", "--ratio", "0.3", "--quiet"]) == 1  # a 224x224 input does not fit its linear layer
    err = capsys.readouterr().err
    assert "cause: mat1 and mat2 shapes cannot be multiplied" in err and "--input-shape" in err
    assert main(["compile", "mynets:branchy", "--ratio", "0.3", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "could not capture Branchy" in err and "hint:" in err and "def forward" not in err  # no graph dumps


def test_the_api_checks_what_it_is_given() -> None:
    import torch
    import torchvision

    import fxprune

    with pytest.raises(fxprune.ArgumentError, match=r"get_model\('resnet18'\)"):
        fxprune.compile("torchvision:resnet18", ratio=0.5)
    with pytest.raises(fxprune.ArgumentError, match="call it to build the module"):
        fxprune.compile(torchvision.models.resnet18, ratio=0.5)
    with pytest.raises(TypeError):
        fxprune.compile(torchvision.models.resnet18(), 0.5)  # targets are keyword-only
    x = torch.randn(1, 3, 32, 32)
    with pytest.warns(UserWarning, match="asks for no pruning"):
        same = fxprune.compile(torchvision.models.resnet18().eval(), target_gflops=1e3, example_inputs=x)
    assert any("asks for no pruning" in n for n in fxprune.report(same).notes)


@pytest.mark.slow
def test_console_script_and_module_entry_points() -> None:
    for cmd in (["fxprune"], [sys.executable, "-m", "fxprune"]):
        if cmd == ["fxprune"]:
            cmd = [str(Path(sys.executable).parent / "fxprune")]
        done = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "fxprune compile torchvision:resnet50 --target-gflops 2.0" in done.stdout


def test_importing_fxprune_leaves_what_few_commands_need_for_later() -> None:
    """Every command starts with ``import fxprune``: it pulls in neither sympy (0.35 s, for an exported program's
    symbolic ranges), networkx (for ``to_networkx``) nor torch's FLOP counter (which imports triton, for counting)."""
    code = "import sys, torch; before = set(sys.modules); import fxprune; print(*sorted(set(sys.modules) - before))"
    added = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout.split()
    heavy = [m for m in added if m.split(".")[0] in {"sympy", "networkx", "triton"} or m == "torch.utils.flop_counter"]
    assert "fxprune.api" in added and not heavy, heavy


def test_cli_calibration_folder_feeds_the_data_driven_selectors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "images" / label / f"{i}.png")
    for selector in ("taylor", "apoz"):
        assert main(["compile", "torchvision:resnet18", "--input-shape", "2,3,32,32", "--ratio", "0.3", "--selector", selector,
                     "--calibration", str(tmp_path / "images"), "--quiet"]) == 0
    capsys.readouterr()
    for argv, message in ((["--selector", "l1", "--calibration", str(tmp_path / "images")], "is only used by the data-driven selectors"),
                          (["--calibration", str(tmp_path / "none")], "no such folder")):
        with pytest.raises(SystemExit) as done:  # a command line that cannot work: exit 2, before any model is built
            main(["compile", "torchvision:resnet18", "--ratio", "0.3", *argv])
        assert done.value.code == 2 and message in capsys.readouterr().err
