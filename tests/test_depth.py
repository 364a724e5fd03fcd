"""drop_layers: whole decoder layers removed from a Hugging Face model, the least influential on calibration data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxprune
from fxprune.errors import ArgumentError
from test_hf import IDS

T = pytest.importorskip("transformers")
TOL = {"rtol": 1e-4, "atol": 1e-5}


def _decoder(cls: str = "Llama") -> nn.Module:
    torch.manual_seed(0)
    config = getattr(T, f"{cls}Config")(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                         num_key_value_heads=2, max_position_embeddings=64)
    return getattr(T, f"{cls}ForCausalLM")(config).eval()


def _calibration() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, 100, (2, 12), generator=gen) for _ in range(2)]


class _Skip(nn.Module):
    """A decoder layer that passes its hidden states through: the oracle of a dropped layer."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


@pytest.mark.parametrize("cls", ["Llama", "Qwen3"])
def test_dropping_a_layer_gives_the_class_that_skips_it(cls: str, tmp_path) -> None:
    """The least influential layer goes: the result is the class with one layer fewer (Qwen3's layer_types
    follow), its logits equal the original's with that layer passing its input through, it generates
    with the KV cache, and it round-trips through save_pretrained."""
    model = _decoder(cls)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = fxprune.drop_layers(model, 1, _calibration())
    record = small.meta["fxprune"]["depth"]
    influence = torch.tensor(record["influence"])
    assert record["dropped"] == [int(influence.argmin())]
    assert type(small) is type(model) and small.config.num_hidden_layers == 3 and len(small.model.layers) == 3
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is left as it was
    layers = model.model.layers
    kept = layers[record["dropped"][0]]
    layers[record["dropped"][0]] = _Skip()
    try:
        with torch.no_grad():
            expected = model(IDS).logits
    finally:
        layers[record["dropped"][0]] = kept
    with torch.no_grad():
        torch.testing.assert_close(small(IDS).logits, expected, **TOL)
        out = small.generate(IDS, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 5)
    if hasattr(small.config, "layer_types"):
        assert len(small.config.layer_types) == 3
    small.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, small(IDS).logits, **TOL)


def test_drop_layers_checks_what_it_is_given() -> None:
    with pytest.raises(ArgumentError, match="from 1 to 3"):
        fxprune.drop_layers(_decoder(), 4, _calibration())
    with pytest.raises(ArgumentError, match="Hugging Face decoder"):
        fxprune.drop_layers(nn.Sequential(nn.Linear(2, 2)), 1, [torch.randn(1, 2)])


class _Timed:
    """A decode comparison as the clock would give it: a speed-up and its interval."""

    def __init__(self, speedup: float, low: float, high: float) -> None:
        self.speedup, self.low, self.high, self.noise = speedup, 1 / high, 1 / low, 0.01

    def meets(self, goal: float) -> bool | None:
        return True if self.high <= goal else False if self.low > goal else None

    def describe(self) -> str:
        return f"{self.speedup}x"


@pytest.mark.parametrize(("timings", "dropped", "error"), [
    ({1: (1.2, 1.15, 1.25), 2: (1.5, 1.4, 1.6)}, 2, None),     # one layer is too few, two meet 1.3x
    ({1: (1.35, 1.32, 1.38)}, 1, None),                          # one layer meets it
    ({1: (1.3, 1.2, 1.4)}, None, fxprune.MeasurementError),      # the interval holds the target: undecided
    ({1: (1.1, 1.05, 1.15), 2: (1.2, 1.15, 1.25), 3: (1.25, 1.2, 1.28)}, None, fxprune.TargetUnreachableError),
])
def test_a_decode_speedup_drops_the_fewest_layers_whose_timing_meets_it(monkeypatch, timings, dropped, error) -> None:
    """The clock faked (one decode comparison per layer count), the rule as shipped: the fewest layers whose
    whole interval clears the target; an undecided interval refuses; a target beyond every count is unreachable."""
    model = _decoder()
    calls = []

    def fake(original, small, prompt, new_tokens, goal):
        k = 4 - small.config.num_hidden_layers
        calls.append(k)
        return _Timed(*timings[k])

    monkeypatch.setattr(fxprune.api, "decode_comparison", fake)
    if error is not None:
        with pytest.raises(error):
            fxprune.drop_layers(model, calibration=_calibration(), speedup=1.3, example_inputs=IDS)
        return
    small = fxprune.drop_layers(model, calibration=_calibration(), speedup=1.3, example_inputs=IDS)
    assert small.config.num_hidden_layers == 4 - dropped and calls == list(range(1, dropped + 1))
    record = small.meta["fxprune"]["depth"]
    assert len(record["dropped"]) == dropped and record["decode"]["speedup"] == timings[dropped][0]
