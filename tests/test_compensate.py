"""compensate=True: the removed channels' calibration means folded into the biases of the layers that read them."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from torch import nn

import fxprune
from fxprune.errors import ArgumentError
from test_hf import IDS, llama

TOL = {"rtol": 1e-4, "atol": 1e-5}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4, bias=False)).eval()


def _batches(seed: int, n: int = 4, shape: tuple[int, ...] = (64, 8)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) + 1 for _ in range(n)]


def test_the_mean_of_removed_relu_channels_brings_the_output_closer() -> None:
    """ReLU outputs have a mean far from zero: with it in the bias (which the layer lacked), held-out outputs
    are closer to the original's than with the channels simply removed (0.0039 against 0.0063 mean squared error)."""
    model, calibration, held = _mlp(), _batches(0), torch.cat(_batches(1))
    x = calibration[0][:1]
    plain = fxprune.compile(model, ratio=0.5, example_inputs=x, calibration=calibration)
    comp = fxprune.compile(model, ratio=0.5, example_inputs=x, calibration=calibration, compensate=True)
    assert comp.meta["fxprune"]["plan"] == plain.meta["fxprune"]["plan"]
    assert comp.meta["fxprune"]["compensated"] == ["2.weight"]
    with torch.no_grad():
        ref = model(held)
        err_plain, err_comp = (plain(held) - ref).pow(2).mean(), (comp(held) - ref).pow(2).mean()
    assert err_comp < 0.75 * err_plain, (err_comp, err_plain)


def _input_means(model: nn.Module, layers: list[str], calibration: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean of each layer's input over every calibration position, by forward hooks on the original."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def record(mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in layers]
    with torch.no_grad():
        for batch in calibration:
            model(batch)
    for h in handles:
        h.remove()
    return {n: sums[n] / counts[n] for n in layers}


def test_a_compensated_decoder_comes_back_as_its_class_with_the_biases_a_hand_computation_gives(tmp_path) -> None:
    """Llama: the output projections of attention and MLP (the one layer that reads their channels) gain
    ``W[:, removed] @ mean(input[removed])``; the config turns on attention_bias and mlp_bias (the other
    projections' biases are zero), the result is a LlamaForCausalLM, and it round-trips through save_pretrained."""
    model = llama().eval()
    gen = torch.Generator().manual_seed(2)
    calibration = [torch.randint(0, 100, (4, IDS.shape[1]), generator=gen) for _ in range(3)]
    plain = fxprune.compile(model, example_inputs=IDS, ratio=0.5, calibration=calibration)
    comp = fxprune.compile(model, example_inputs=IDS, ratio=0.5, calibration=calibration, compensate=True)
    assert type(comp) is T.LlamaForCausalLM and comp.config.attention_bias and comp.config.mlp_bias
    outputs = [f"model.layers.{i}.{p}" for i in range(model.config.num_hidden_layers) for p in ("self_attn.o_proj", "mlp.down_proj")]
    assert comp.meta["fxprune"]["compensated"] == [f"{n}.weight" for n in outputs]
    means = _input_means(model, outputs, calibration)
    kept = comp.meta["fxprune"]["kept"]["parameters"]
    for name in outputs:
        cols = torch.tensor(kept[f"{name}.weight"]["1"])
        gone = torch.ones(means[name].numel(), dtype=torch.bool).index_fill_(0, cols, False)
        w = model.get_submodule(name).weight.detach().double()
        expected = (w[:, gone] @ means[name][gone]).float()
        if "0" in kept[f"{name}.weight"]:
            expected = expected[kept[f"{name}.weight"]["0"]]
        torch.testing.assert_close(comp.get_submodule(name).bias.detach(), expected, **TOL)
        plain.get_submodule(name).bias = nn.Parameter(expected)  # the oracle: the same plan, biases by hand
    assert not comp.get_submodule("model.layers.0.self_attn.q_proj").bias.any()
    with torch.no_grad():
        torch.testing.assert_close(comp(IDS).logits, plain(IDS).logits, **TOL)
    comp.save_pretrained(tmp_path)
    again = T.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, comp(IDS).logits, **TOL)


def test_compensation_needs_calibration_data() -> None:
    with pytest.raises(ArgumentError, match="pass calibration="):
        fxprune.compile(_mlp(), ratio=0.5, example_inputs=torch.randn(1, 8), compensate=True)
