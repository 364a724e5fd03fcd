"""Hugging Face transformers models, built from small configs with random weights, compiled directly."""

from __future__ import annotations

import pytest
import torch

import fxprune
from fxprune import pipeline
from fxprune.api import FLOPS_WITH_DATA

T = pytest.importorskip("transformers")

IDS = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(0))
IMAGE = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=100)


def gpt2() -> torch.nn.Module:
    return T.GPT2LMHeadModel(T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0))


def bert() -> torch.nn.Module:
    return T.BertForSequenceClassification(T.BertConfig(**TEXT, num_attention_heads=4, num_labels=3))


def vit() -> torch.nn.Module:
    return T.ViTForImageClassification(T.ViTConfig(image_size=64, patch_size=16, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                   intermediate_size=128, num_labels=3))


def convnextv2() -> torch.nn.Module:
    return T.ConvNextV2ForImageClassification(T.ConvNextV2Config(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3))


def llama() -> torch.nn.Module:
    return T.LlamaForCausalLM(T.LlamaConfig(**TEXT, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def llama_tied() -> torch.nn.Module:
    """Input and output embeddings tied (Llama 3.2 1B's config): the pruned model ties them again."""
    return T.LlamaForCausalLM(T.LlamaConfig(**TEXT, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                            tie_word_embeddings=True))


def qwen2() -> torch.nn.Module:
    return T.Qwen2ForCausalLM(T.Qwen2Config(**TEXT, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def segformer(heads: tuple[int, int] = (1, 2)) -> torch.nn.Module:
    return T.SegformerForSemanticSegmentation(T.SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], num_attention_heads=list(heads), decoder_hidden_size=32,
        num_labels=3, strides=[4, 2], patch_sizes=[7, 3], mlp_ratios=[2, 2]))


def swin() -> torch.nn.Module:
    return T.SwinForImageClassification(T.SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4,
                                                     num_labels=3))


ZOO = [(llama, IDS), (qwen2, IDS), (gpt2, IDS), (bert, IDS), (segformer, IMAGE), (convnextv2, IMAGE), (vit, IMAGE), (swin, IMAGE)]


@pytest.mark.parametrize("make, x", [case if case[0] in (llama, vit) else pytest.param(*case, marks=pytest.mark.slow) for case in ZOO],
                         ids=lambda v: getattr(v, "__name__", ""))  # the quick lane compiles the other six in other tests (17 s here)
def test_a_model_compiles_directly_freezing_only_its_input_and_output_and_keeps_its_output_structure(make, x: torch.Tensor) -> None:
    model = make().eval()
    graph = fxprune.analyze(model, x)
    assert all(r.startswith(("model input", "model output")) for g in graph.groups for r in g.frozen), [g.frozen for g in graph.groups]
    pruned = fxprune.compile(model, example_inputs=x, ratio=0.5)
    with torch.no_grad():
        out, ref = pruned(x), model(x)
    assert type(out) is type(ref) and out.logits.shape == ref.logits.shape
    before, after = fxprune.report(pruned).flops
    assert after <= 0.5 * before


def test_the_users_config_keeps_its_cache_setting() -> None:
    model = gpt2().eval()
    fxprune.compile(model, example_inputs=IDS, ratio=0.3)
    assert model.config.use_cache is True


def test_a_pruned_model_saves_and_loads_with_its_output_structure(tmp_path) -> None:
    """A graph (layers at different widths: no config describes them) saves with fxprune.save."""
    pruned = fxprune.compile(gpt2().eval(), example_inputs=IDS, ratio=0.5, equal_widths=False)
    assert isinstance(pruned, torch.fx.GraphModule)
    fxprune.save(pruned, tmp_path / "gpt2.fxp")
    loaded = fxprune.load(tmp_path / "gpt2.fxp")
    with torch.no_grad():
        out, ref = loaded(IDS), pruned(IDS)
    assert type(out) is type(ref)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [llama, llama_tied, qwen2], ids=lambda f: f.__name__)
def test_a_pruned_decoder_is_its_class_with_a_true_config_generates_and_round_trips(make, tmp_path) -> None:
    model = make().eval()
    pruned = fxprune.compile(model, example_inputs=IDS, ratio=0.5)
    assert type(pruned) is type(model) and pruned.meta["fxprune"]["huggingface"]["returned"] == type(model).__name__
    c, layer = pruned.config, pruned.model.layers[1]
    assert c.num_attention_heads < 4 and c.num_key_value_heads < 2 and c.intermediate_size < 128  # heads and MLP both pruned
    assert layer.self_attn.q_proj.weight.shape == (c.num_attention_heads * c.head_dim, c.hidden_size)
    assert layer.self_attn.k_proj.weight.shape == (c.num_key_value_heads * c.head_dim, c.hidden_size)
    assert layer.mlp.up_proj.weight.shape == (c.intermediate_size, c.hidden_size)
    assert c.num_attention_heads % c.num_key_value_heads == 0 and model.config.num_attention_heads == 4  # the user's config is untouched
    assert (pruned.lm_head.weight is pruned.model.embed_tokens.weight) == bool(model.config.tie_word_embeddings)
    out = pruned.generate(IDS, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 8)
    pruned.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, pruned(IDS).logits, rtol=1e-5, atol=1e-5)


CALIBRATION = [torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(3)]


@pytest.mark.slow
def test_wanda_scores_every_head_and_channel_of_a_decoder_which_comes_back_as_its_class() -> None:
    model = llama().eval()
    a = pipeline.analyze(model, IDS)
    scores = fxprune.SELECTORS["wanda"](CALIBRATION).scores(a.deps, a.gm)
    assert set(scores) == {g.id for g in a.deps.prunable_groups}
    assert all(scores[g.id].shape == (g.width,) for g in a.deps.prunable_groups)
    assert all(bool(torch.isfinite(v).all() and (v > 0).all()) for v in scores.values())  # every atom is read by some weight
    pruned = fxprune.compile(model, example_inputs=IDS, ratio=0.3, selector="wanda", calibration=CALIBRATION)
    assert type(pruned) is type(model) and pruned.config.intermediate_size < 128
    assert pruned.meta["fxprune"]["strategy"]["selector"] == "wanda"


def test_calibration_without_a_selector_takes_the_data_driven_default_under_a_flops_target() -> None:
    model = llama().eval()
    given = fxprune.compile(model, example_inputs=IDS, ratio=0.3, calibration=CALIBRATION)
    assert given.meta["fxprune"]["strategy"]["selector"] == FLOPS_WITH_DATA
    assert type(given) is type(model)
    with pytest.warns(UserWarning, match="loss_fn= is not read by 'wanda'"):
        with_loss = fxprune.compile(model, example_inputs=IDS, ratio=0.3, calibration=CALIBRATION, loss_fn=lambda out, target: out.logits.sum())
    assert with_loss.meta["fxprune"]["strategy"]["selector"] == FLOPS_WITH_DATA
    assert with_loss.meta["fxprune"]["plan"] == given.meta["fxprune"]["plan"]


def test_layers_pruned_to_different_widths_come_back_as_a_graph_with_the_reason() -> None:
    model = llama().eval()
    graph = fxprune.analyze(model, IDS)
    mlp = [g for g in graph.prunable_groups if any(m.name.endswith("mlp.up_proj.weight") and m.dim == 0 for m in g.members)]
    plan = fxprune.Plan({mlp[0].id: list(range(64)), mlp[1].id: list(range(96))})
    pruned = fxprune.apply_plan(model, plan, example_inputs=IDS)
    assert isinstance(pruned, torch.fx.GraphModule)
    assert "more than one intermediate_size (64, 96)" in pruned.meta["fxprune"]["huggingface"]["why"]


def test_saving_a_pruned_decoder_with_fxprune_points_to_save_pretrained(tmp_path) -> None:
    pruned = fxprune.compile(llama().eval(), example_inputs=IDS, ratio=0.5)
    with pytest.raises(fxprune.ArgumentError, match="save_pretrained"):
        fxprune.save(pruned, tmp_path / "llama.fxp")


def bart() -> torch.nn.Module:
    return T.BartForConditionalGeneration(T.BartConfig(vocab_size=100, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                                                       decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64))


def t5() -> torch.nn.Module:
    return T.T5ForConditionalGeneration(T.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4))


@pytest.mark.parametrize("make", [bart, pytest.param(t5, marks=pytest.mark.slow)], ids=lambda f: getattr(f, "__name__", ""))
def test_encoder_decoders_with_cross_attention_prune_and_freeze_only_with_a_reason(make) -> None:
    """Keys and values from the encoder's sequence: BART's cross-attention heads prune; T5's bias of literal
    head count (zeros of n_heads) keeps its cross-attention heads, with that reason."""
    model = make().eval()
    inputs = (IDS, None, IDS[:, :5])
    graph = fxprune.analyze(model, inputs)
    frozen = {r.split(" at node ")[0] for g in graph.groups for r in g.frozen}
    assert frozen <= {"model output", "the mask of scaled_dot_product_attention"}, frozen
    assert any(any(".q" in m.name and m.dim == 0 for m in g.members) for g in graph.prunable_groups)
    pruned = fxprune.compile(model, example_inputs=inputs, ratio=0.4)
    before, after = fxprune.report(pruned).flops
    assert after <= 0.6 * before


def test_gradual_pruning_fine_tunes_the_decoder_as_its_class() -> None:
    """prune_iteratively hands fine-tuning a LlamaForCausalLM at every step (its loss and labels work), and
    what fine-tuning changed is what the next step prunes."""
    classes, before, after = [], [], []

    def finetune(model: torch.nn.Module) -> None:
        classes.append(type(model).__name__)
        before.append(model.lm_head.weight.detach().clone())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model.train()
        model(IDS, labels=IDS).loss.backward()
        opt.step()
        model.eval()
        after.append(model.lm_head.weight.detach().clone())

    pruned, _ = fxprune.prune_iteratively(llama().eval(), finetune=finetune, example_inputs=IDS, ratio=0.5, steps=2)
    assert classes == ["LlamaForCausalLM", "LlamaForCausalLM"] and type(pruned).__name__ == "LlamaForCausalLM"
    assert pruned.generate(IDS, max_new_tokens=4, min_new_tokens=4).shape == (1, 12)
    tuned, second = after[0], before[1]  # step 2 starts from step 1's fine-tuned weights (columns may go)
    assert not torch.equal(tuned, before[0]) and second.shape[1] <= tuned.shape[1]
    assert all(any(torch.equal(col, c) for c in tuned.T) for col in second.T)


def test_per_head_norms_over_head_dim_keep_heads_prunable() -> None:
    """Qwen3 normalizes q and k per head over head_dim (RMSNorm weights of head_dim): those weights hold
    positions within a head, so they stay whole and the grouped-query heads still prune."""
    model = T.Qwen3ForCausalLM(T.Qwen3Config(**TEXT, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
    graph = fxprune.analyze(model, IDS)
    heads = [g for g in graph.prunable_groups if any(m.name.endswith("k_proj.weight") and m.dim == 0 for m in g.members)]
    assert len(heads) == 2 and all(g.width == 2 for g in heads)
    frozen = {r.split(" at node ")[0].split(" reads ")[-1] for g in graph.groups for r in g.frozen}
    assert frozen <= {"model input input_ids", "model output", "a table of parameters or buffers along positions that are not channels"}, frozen
    pruned = fxprune.compile(model, example_inputs=IDS, ratio=0.5)
    assert type(pruned) is type(model) and pruned.generate(IDS, max_new_tokens=4, min_new_tokens=4).shape == (1, 12)
