"""Hugging Face models whose configs hold widths per stage or derive the head size come back as their class.

Small configs with random weights, nothing downloaded. Outputs are compared in float32 within rtol=atol=1e-4
(the class and the graph run the same ops in a different order of fusion).
"""

from __future__ import annotations

import inspect

import pytest
import torch

import fxprune
from fxprune import pipeline
from fxprune.core.groups import Plan
from fxprune.core.masks import removed_mask
from fxprune.passes.rewrite import rewrite
from fxprune.errors import VerificationError
from fxprune.passes.verify import build_oracle, verify_same
from fxprune.results.hfconfig import probe, truthful_config

T = pytest.importorskip("transformers")

import test_hf  # noqa: E402 - after the skip: it builds transformers' classes
from test_hf import IDS, IMAGE, bert, convnextv2, gpt2, swin  # noqa: E402

TOL = {"rtol": 1e-4, "atol": 1e-4}


def segformer() -> torch.nn.Module:
    """Two heads in the first stage: a stage of one head keeps its width (the head size is hidden / heads)."""
    return test_hf.segformer(heads=(2, 4))


def opt() -> torch.nn.Module:
    """Embeddings as wide as the hidden size (``word_embed_proj_dim``): no projection between them, before or after."""
    return T.OPTForCausalLM(T.OPTConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                                        word_embed_proj_dim=64, max_position_embeddings=64))


def electra() -> torch.nn.Module:
    """``embedding_size`` equal to ``hidden_size``, as in ELECTRA-base."""
    return T.ElectraForSequenceClassification(T.ElectraConfig(vocab_size=100, embedding_size=64, hidden_size=64, num_hidden_layers=2,
                                                              num_attention_heads=4, intermediate_size=128, max_position_embeddings=64))


def distilbert() -> torch.nn.Module:
    """Widths named ``dim``, ``hidden_dim``, heads ``n_heads``; the head size is dim / n_heads."""
    return T.DistilBertForSequenceClassification(T.DistilBertConfig(vocab_size=100, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                                                    max_position_embeddings=64))


def gpt_neo() -> torch.nn.Module:
    """Heads counted by ``num_heads``, the head size hidden_size / num_heads."""
    return T.GPTNeoForCausalLM(T.GPTNeoConfig(vocab_size=100, hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=64,
                                              attention_types=[[["global", "local"], 1]]))


def stablelm() -> torch.nn.Module:
    """The head size is hidden_size / num_attention_heads, and key/value heads are grouped: 2 heads of 16 and 4 heads of 8
    give the same shapes, and only the first is the pruned graph (its rotary embedding reads 16)."""
    return T.StableLmForCausalLM(T.StableLmConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def deberta_v2() -> torch.nn.Module:
    """A pooler whose width is a field of its own (``pooler_hidden_size``, the hidden size unless given)."""
    return T.DebertaV2ForSequenceClassification(T.DebertaV2Config(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                                  intermediate_size=128, max_position_embeddings=64))


def _logits(out: object) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


@pytest.mark.parametrize("make, x", [(gpt2, IDS), (bert, IDS), (swin, IMAGE), (convnextv2, IMAGE), (opt, IDS), (stablelm, IDS),
                                     *(pytest.param(m, x, marks=pytest.mark.slow)
                                       for m, x in ((segformer, IMAGE), (electra, IDS), (distilbert, IDS), (gpt_neo, IDS), (deberta_v2, IDS)))],
                         ids=lambda v: getattr(v, "__name__", ""))
def test_a_model_comes_back_as_its_class_matching_the_pruned_graph_and_round_trips(make, x: torch.Tensor, tmp_path) -> None:
    model = make().eval()
    pruned = fxprune.compile(model, example_inputs=x, ratio=0.5)
    assert type(pruned) is type(model), pruned.meta["fxprune"]["huggingface"]
    before, after = fxprune.report(pruned).flops
    assert after <= 0.5 * before
    _matches_its_graph_and_round_trips(model, pruned, x, tmp_path)


def gemma(tied: bool = True) -> torch.nn.Module:
    return T.GemmaForCausalLM(T.GemmaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=tied))


@pytest.mark.parametrize("tied", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["tied", "untied"])
def test_embeddings_scaled_by_the_hidden_size_follow_a_pruned_hidden_size(tied: bool, tmp_path) -> None:
    """Gemma multiplies its embeddings by sqrt(hidden_size), a number its class computes from the config: with the hidden
    size pruned it comes back as its class, its embedding weights carrying the original's number over the new one and,
    where the output head shares them, its final norm dividing by the same; it generates and round-trips."""
    model = gemma(tied).eval()
    pruned = fxprune.compile(model, example_inputs=IDS, ratio=0.5)
    assert type(pruned) is type(model), pruned.meta["fxprune"]["huggingface"]
    assert pruned.config.hidden_size < model.config.hidden_size
    assert pruned.model.embed_tokens.embed_scale < model.model.embed_tokens.embed_scale
    assert pruned.generate(IDS, max_new_tokens=3, min_new_tokens=3, do_sample=False).shape == (1, IDS.shape[1] + 3)
    _matches_its_graph_and_round_trips(model, pruned, IDS, tmp_path)


def test_embeddings_rescaled_in_bfloat16_come_back_within_one_rounding() -> None:
    """A bfloat16 Gemma's rescaled weights are rounded once, so its class gives the pruned graph's outputs to within
    that rounding (0.0078 in outputs of 1.15), not to the 1e-4 of the same ops on the same weights: it is checked
    within 8 epsilons of its dtype and comes back as its class (a graph before)."""
    model = gemma().eval().to(torch.bfloat16)
    pruned = fxprune.compile(model, example_inputs=IDS, ratio=0.5)
    assert type(pruned) is type(model), pruned.meta["fxprune"]["huggingface"]
    assert pruned.dtype == torch.bfloat16 and pruned.config.hidden_size < model.config.hidden_size


def _matches_its_graph_and_round_trips(model: torch.nn.Module, pruned: torch.nn.Module, x: torch.Tensor, tmp_path) -> None:
    """``pruned`` (a class) gives the outputs of the graph its plan rewrites, and so does what ``save_pretrained`` wrote."""
    a = pipeline.analyze(model, x, announce=False)
    graph = rewrite(a.gm, a.deps, Plan({int(k): v for k, v in pruned.meta["fxprune"]["plan"].items()}))
    pruned.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        out = _logits(pruned(x))
        torch.testing.assert_close(out, _logits(graph(x)), **TOL)
        torch.testing.assert_close(_logits(loaded(x)), out, **TOL)


def test_a_pruned_gpt2_keeps_its_head_size_and_generates() -> None:
    pruned = fxprune.compile(gpt2().eval(), example_inputs=IDS, ratio=0.5)
    c = pruned.config
    assert c.n_embd // c.n_head == 16 and c.n_head < 4
    assert pruned.generate(IDS, max_new_tokens=6, min_new_tokens=6, do_sample=False).shape == (1, IDS.shape[1] + 6)


def test_layers_pruned_to_different_widths_say_so_and_a_report_has_no_tracing_noise() -> None:
    """The result stays the pruned graph, and that graph takes any batch and sequence length, as the note says."""
    pruned = fxprune.compile(bert().eval(), example_inputs=IDS, ratio=0.5, equal_widths=False)
    why = pruned.meta["fxprune"]["huggingface"].get("why", "")
    assert isinstance(pruned, torch.fx.GraphModule) and "equal_widths=False" in why and "equal_widths=True" not in why
    assert any("dynamic dims: batch of input 0, sequence of input 0" in n for n in pruned.meta["fxprune"]["report"]["notes"])
    assert "co_varnames" not in str(fxprune.report(pruned))
    ids = torch.randint(1, 100, (3, 19), generator=torch.Generator().manual_seed(1))
    assert _logits(pruned(ids)).shape == (3, bert().config.num_labels)


def test_a_target_beyond_the_configs_widths_gives_a_graph_with_that_reason() -> None:
    """One head in SegFormer's first stage: its widths stay, and ratio=0.5 needs them pruned."""
    model = test_hf.segformer(heads=(1, 2)).eval()
    pruned = fxprune.compile(model, example_inputs=IMAGE, ratio=0.5)
    assert isinstance(pruned, torch.fx.GraphModule)
    assert "config can describe" in pruned.meta["fxprune"]["huggingface"]["why"]


@pytest.mark.parametrize("make", [test_hf.llama, gpt2, bert], ids=lambda f: f.__name__)
def test_a_pruned_language_model_takes_any_batch_length_and_padding(make) -> None:
    """The result is its class: batch 3 at lengths 5 and 17 with an attention mask; a padded row's
    outputs equal the row's alone (decoders padded on the left with their positions, BERT on the right)."""
    model = make().eval()
    pruned = fxprune.compile(model, example_inputs=IDS, ratio=0.5)
    assert type(pruned) is type(model)
    decoder = make is not bert
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for length in (5, 17):
            ids = torch.randint(1, 100, (3, length), generator=gen)
            mask = torch.ones(3, length, dtype=torch.long)
            if decoder:
                mask[0, :2] = 0
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                out = _logits(pruned(input_ids=ids, attention_mask=mask, position_ids=positions))
                alone = _logits(pruned(input_ids=ids[:1, 2:]))
                torch.testing.assert_close(out[0, -1], alone[0, -1], **TOL)
            else:
                mask[0, -2:] = 0
                out = _logits(pruned(input_ids=ids, attention_mask=mask))
                alone = _logits(pruned(input_ids=ids[:1, :-2]))
                torch.testing.assert_close(out[0], alone[0], **TOL)
            assert out.shape[0] == 3


def _padded(ids: torch.Tensor, decoder: bool) -> dict[str, torch.Tensor]:
    """Keyword inputs of a batch whose first row has two pad tokens: on the left with its positions (a decoder), else on the right."""
    mask = torch.ones_like(ids)
    if not decoder:
        mask[0, -2:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    mask[0, :2] = 0
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


@pytest.mark.parametrize("make", [test_hf.llama, pytest.param(gpt2, marks=pytest.mark.slow), pytest.param(bert, marks=pytest.mark.slow)],
                         ids=lambda f: f.__name__)  # the quick lane keeps the rotary decoder; GPT-2 and BERT add 7 s to it
def test_a_pruned_language_model_at_other_shapes_matches_its_masked_original(make) -> None:
    """Compiled at (1, 8), the result run at batch 3 and length 17, with an attention mask, equals within TOL the
    original with the removed channels zeroed (verify.py's oracle, captured at that shape). The plan applied at that
    shape by ``apply_plan(verify=True)`` passes its check, finds the same groups (fingerprint) and gives the same outputs.
    The inputs are given positionally in the order of the class's forward (GPT-2's cache slot is None)."""
    torch.manual_seed(0)
    model = make().eval()
    pruned = fxprune.compile(model, example_inputs=IDS, ratio=0.5)
    record = pruned.meta["fxprune"]
    plan = Plan({int(k): v for k, v in record["plan"].items()})
    names = list(inspect.signature(type(model).forward).parameters)[1:]
    gen = torch.Generator().manual_seed(1)
    given = _padded(torch.randint(1, 100, (3, 17), generator=gen), decoder=make is not bert)  # a shorter length: the padding test
    inputs = tuple(given.get(n) for n in names[:max(map(names.index, given)) + 1])
    again = fxprune.apply_plan(model, record["plan"], example_inputs=inputs, verify=True)
    assert type(again) is type(model) and "verified" in again.meta["fxprune"]
    assert again.meta["fxprune"]["fingerprint"] == record["fingerprint"]
    a = pipeline.analyze(model, inputs, announce=False)
    oracle = build_oracle(a.gm, a.deps, removed_mask(a.deps, plan))
    with torch.no_grad():
        out = _logits(pruned(**given))
        assert out.shape[0] == 3
        torch.testing.assert_close(out, _logits(oracle(*inputs)), **TOL)
        torch.testing.assert_close(out, _logits(again(**given)), **TOL)


@pytest.mark.parametrize("ratio", [0.3, 0.45])
def test_a_decoder_keeps_a_hidden_size_its_config_accepts_for_the_heads_it_keeps(ratio: float, tmp_path) -> None:
    """LlamaConfig validates hidden_size % num_attention_heads == 0 (although its head size is head_dim):
    when 6 of 8 heads stay, the hidden size is lowered to a multiple of 6, so the result is its class and
    from_pretrained takes what save_pretrained wrote."""
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)).eval()
    pruned = fxprune.compile(model, example_inputs=IDS, ratio=ratio)
    assert type(pruned) is T.LlamaForCausalLM, pruned.meta["fxprune"]["huggingface"]
    c = pruned.config
    assert c.num_attention_heads < 8 and c.hidden_size % c.num_attention_heads == 0
    pruned.save_pretrained(tmp_path)
    again = T.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, pruned(IDS).logits, **TOL)


def test_a_pruned_bart_comes_back_as_its_class_and_generates(tmp_path) -> None:
    """An encoder-decoder whose heads derive their size from d_model: its class returns, generates, and round-trips."""
    torch.manual_seed(0)
    model = T.BartForConditionalGeneration(T.BartConfig(
        vocab_size=64, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=256, decoder_ffn_dim=256, max_position_embeddings=64)).eval()
    ids = torch.randint(3, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    pruned = fxprune.compile(model, example_inputs=ids, ratio=0.5)
    assert type(pruned) is T.BartForConditionalGeneration, pruned.meta["fxprune"]["huggingface"]
    assert pruned.config.encoder_ffn_dim < 256
    with torch.no_grad():
        assert pruned.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False).shape[0] == 1
    pruned.save_pretrained(tmp_path)
    again = T.BartForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, pruned(ids).logits, **TOL)


def test_a_config_that_cannot_give_the_pruned_shapes_is_refused_naming_the_parameter() -> None:
    """The reason names the first parameter the solved config builds otherwise, and the widths it solved."""
    p = probe(gpt2())
    shapes = {**p.shapes, "transformer.wte.weight": (99, 64)}  # a vocabulary no width field sizes
    config, why = truthful_config(p, shapes)
    assert config is None
    assert "GPT2LMHeadModel's transformer.wte.weight is (100, 64) where the pruned graph's is (99, 64)" in why, why


def test_a_rebuilt_class_that_computes_otherwise_is_named_in_the_reason_not_called_a_coupling_bug() -> None:
    """``verify_same`` compares a class rebuilt from the solved config with the pruned graph: its message names both."""
    graph, rebuilt = torch.nn.Linear(4, 4).eval(), torch.nn.Linear(4, 4).eval()
    with pytest.raises(VerificationError) as info:
        verify_same(graph, rebuilt, (torch.randn(2, 4),))
    assert str(info.value).startswith("output 0: Linear built from the solved config differs from the pruned graph by ")
    assert "bug" not in str(info.value)
    with pytest.raises(VerificationError, match="^Linear built from the solved config fails to run: RuntimeError"):
        verify_same(graph, torch.nn.Linear(3, 4), (torch.randn(2, 4),))


@pytest.mark.slow
def test_a_graph_captured_with_a_mask_takes_any_batch_length_and_left_padding() -> None:
    """A result that stays a graph takes what it was captured with: given ``(ids, attention_mask)``, Llama's graph
    (layers pruned to different widths, which no config describes) runs at another batch and length with left
    padding, as the model does (nothing removed: the same outputs)."""
    torch.manual_seed(0)
    model = test_hf.llama().eval()
    a = pipeline.analyze(model, (IDS, torch.ones_like(IDS)), announce=False)
    graph = rewrite(a.gm, a.deps, Plan({}))
    ids = torch.randint(1, 100, (2, 13), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        want, got = model(ids, attention_mask=mask).logits, graph(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[1], want[1], **TOL)
    torch.testing.assert_close(got[0, 4:], want[0, 4:], **TOL)
    mlp = [g for g in a.deps.prunable_groups if any(m.name.endswith("mlp.up_proj.weight") and m.dim == 0 for m in g.members)]
    pruned = fxprune.apply_plan(model, Plan({mlp[0].id: list(range(64)), mlp[1].id: list(range(96))}), example_inputs=(IDS, torch.ones_like(IDS)))
    assert isinstance(pruned, torch.fx.GraphModule)
    assert _logits(pruned(ids, attention_mask=mask)).shape == (2, 13, 100)
