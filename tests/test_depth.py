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
