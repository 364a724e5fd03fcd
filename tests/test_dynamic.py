"""Results of any batch size: dynamic dims on the torch.export path and in archives, calibration batches
of another size than the example, and loaded models that fine-tune."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxprune
from conftest import lively
from fxprune.core import dynamic

X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
TOL = dict(atol=1e-4, rtol=1e-4)  # float32 sums in another order at another batch size


def resnet() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return lively(torchvision.models.resnet18(weights=None).eval())


def batch(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(n))


def rowwise(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model`` run on each sample of ``x`` alone, at batch 1 (the size it was verified at)."""
    with torch.no_grad():
        return torch.cat([model(x[i:i + 1]) for i in range(len(x))])


@pytest.fixture(scope="module")
def from_program() -> nn.Module:
    return fxprune.compile(torch.export.export(resnet(), (X,)), ratio=0.5, example_inputs=X)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    pruned = fxprune.compile(resnet(), ratio=0.5, example_inputs=X)
    path = tmp_path_factory.mktemp("archive") / "resnet18.pt2"
    fxprune.save(pruned, path)
    return pruned, path


def test_a_static_exported_program_gives_a_result_of_any_batch(from_program: nn.Module) -> None:
    assert "dynamic dims: batch of input 0" in " ".join(fxprune.report(from_program).notes)
    for n in (1, 4, 16):
        x = batch(n)
        with torch.no_grad():
            torch.testing.assert_close(from_program(x), rowwise(from_program, x), **TOL)


def test_a_loaded_archive_takes_any_batch(saved: tuple[nn.Module, Path]) -> None:
    pruned, path = saved
    loaded = fxprune.load(path)
    assert loaded.meta["fxprune"]["dims"] == "dynamic dims: batch of input 0"
    for n in (1, 4, 16):
        with torch.no_grad():
            torch.testing.assert_close(loaded(batch(n)), pruned(batch(n)), **TOL)


def test_a_loaded_archive_fine_tunes(saved: tuple[nn.Module, Path]) -> None:
    loaded = fxprune.load(saved[1])
    assert not loaded.training
    reference = loaded(X).detach()
    before = {n: p.detach().clone() for n, p in loaded.named_parameters()}
    stats = loaded.get_buffer("bn1.running_mean").clone()
    loaded.train()
    opt = torch.optim.SGD(loaded.parameters(), lr=0.1)
    loss = F.cross_entropy(loaded(batch(4)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    changed = [n for n, p in loaded.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    assert not torch.equal(stats, loaded.get_buffer("bn1.running_mean"))  # batch norm ran on batch statistics
    loaded.eval()
    assert not torch.allclose(loaded(X), reference, **TOL)  # the step changed what eval computes
    torch.testing.assert_close(loaded(X), loaded(X), **TOL)  # and eval is deterministic again


def test_the_cli_says_how_to_fine_tune_after_save(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fxprune.cli import main  # noqa: PLC0415 - the command line only here
    path = tmp_path / "r.pt2"
    assert main(["compile", "torchvision:resnet18", "--input-shape", "1,3,64,64", "--ratio", "0.3", "--save", str(path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"fxprune.load({str(path)!r})" in out and f"fxprune.apply_plan(<a fresh instance of torchvision:resnet18>, {str(path)!r})" in out


class Pinned(nn.Module):
    """A model whose first input must have batch 1 (a literal in its reshape); its second is free."""

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return x.view(1, 3).sum() + ids.float().sum(1)


def test_a_dim_the_model_pins_falls_back_to_static_with_the_reason() -> None:
    ep, note = dynamic.export(Pinned(), (torch.randn(1, 3), torch.ones(2, 5, dtype=torch.long)))  # static: export never fails for a dim
    assert note.startswith("dynamic dims: none; static") and "batch of input 0" in note and "[1, 3]" in note
    torch.testing.assert_close(ep.module()(torch.zeros(1, 3), torch.ones(2, 5, dtype=torch.long)), torch.full((2,), 5.0), **TOL)


@pytest.mark.parametrize("expr", ["__import__('os').system('true')", "Symbol('s1').func", "Symbol(x)"])
def test_an_archive_with_code_in_a_symbolic_shape_is_refused(saved: tuple[nn.Module, Path], tmp_path: Path, expr: str) -> None:
    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(saved[1]) as zin, zipfile.ZipFile(bad, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name.endswith("models/model.json"):
                first = re.search(r'"expr_str": "([^"]*)"', data.decode())
                assert first is not None
                data = (data.decode()[:first.start(1)] + expr + data.decode()[first.end(1):]).encode()
            zout.writestr(name, data)
    with pytest.raises(fxprune.ArchiveError, match="symbolic shape that is not a size expression"):
        fxprune.load(bad)


def cnn(exported: bool) -> nn.Module | torch.export.ExportedProgram:
    model = resnet()
    return torch.export.export(model, (X,)) if exported else model


@pytest.mark.parametrize("selector", ["taylor", "bn_taylor"])
@pytest.mark.parametrize("exported", [False, True], ids=["traced", "exported"])
def test_calibration_batches_need_not_have_the_examples_size_on_a_cnn(selector: str, exported: bool) -> None:
    data = [(batch(8), torch.arange(8)) for _ in range(2)]
    pruned = fxprune.compile(cnn(exported), ratio=0.3, example_inputs=X, selector=selector, calibration=data, loss_fn=F.cross_entropy)
    assert pruned(batch(8)).shape == (8, 1000)


def llama() -> nn.Module:
    T = pytest.importorskip("transformers")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=100,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return T.LlamaForCausalLM(config).eval()


def next_token_loss(out: object, ids: torch.Tensor) -> torch.Tensor:
    logits = out["logits"] if isinstance(out, dict) else out.logits  # a ModelOutput (a dict) either way
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


@pytest.mark.parametrize("selector", ["taylor", "bn_taylor"])
def test_calibration_batches_need_not_have_the_examples_size_on_a_decoder(selector: str) -> None:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (1, 8), generator=gen)
    data = [(b, b) for b in (torch.randint(0, 100, (8, 8), generator=gen) for _ in range(2))]
    pruned = fxprune.compile(llama(), ratio=0.3, example_inputs=ids, selector=selector, calibration=data, loss_fn=next_token_loss)
    assert pruned(data[0][0]).logits.shape == (8, 8, 100)
