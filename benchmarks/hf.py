"""Hugging Face transformers models through fxprune: what couples, what stays frozen and why.

Each model is built from a small config with random weights (nothing is downloaded) and compiled
directly, its ``ModelOutput`` and all, at ``ratio=0.5`` with verification; a model that cannot reach it
is reported with the most its prunable groups allow. Printed per model: dependency groups, how many
are prunable, frozen groups other than the model's input and output with their reasons, FLOPs before and
after, compile time, the result's class (the model's own where its config can describe the pruned
widths, else a GraphModule) and the output type it returns.

A decoder at a realistic size (``--decoder``, a Llama-3.2-1B-shaped config with random weights): a
quarter of the attention heads (whole key/value groups: 8 -> 6 key/value heads, 32 -> 24 query heads)
and 40% of the MLP channels go in every layer (the first ones are kept: with random weights which
channels go does not change speed); printed are the time to analyze and to prune (capture, coupling,
rewrite, verification, the model rebuilt as its class), parameters, and ``generate()`` tokens per second
of the original and the pruned model, timed in turns (median of the rounds, and their ratio).

    python benchmarks/hf.py                 # the zoo (docs/benchmarks.md)
    python benchmarks/hf.py --models gpt2,bert
    python benchmarks/hf.py --decoder       # the 1B decoder (docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import collections
import logging
import statistics
import time
import warnings

import torch
from tabulate import tabulate

import fxprune

TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 100}
IMAGE = {"image_size": 64, "num_labels": 3}
ZOO: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {**TEXT, "num_attention_heads": 4, "num_key_value_heads": 2}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {**TEXT, "num_attention_heads": 4, "num_key_value_heads": 2}),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100, "bos_token_id": 0, "eos_token_id": 0}),
    "bert": ("BertForSequenceClassification", "BertConfig", {**TEXT, "num_attention_heads": 4, "num_labels": 3}),
    "bart": ("BartForConditionalGeneration", "BartConfig", {"vocab_size": 100, "d_model": 64, "encoder_layers": 1, "decoder_layers": 1,
                                                            "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 256,
                                                            "decoder_ffn_dim": 256, "max_position_embeddings": 64}),
    "segformer": ("SegformerForSemanticSegmentation", "SegformerConfig", {
        "num_encoder_blocks": 2, "depths": [1, 1], "sr_ratios": [2, 1], "hidden_sizes": [16, 32], "num_attention_heads": [2, 4],
        "decoder_hidden_size": 32, "num_labels": 3, "strides": [4, 2], "patch_sizes": [7, 3], "mlp_ratios": [2, 2]}),
    "convnextv2": ("ConvNextV2ForImageClassification", "ConvNextV2Config", {"num_stages": 2, "hidden_sizes": [16, 32], "depths": [1, 1], "num_labels": 3}),
    "vit": ("ViTForImageClassification", "ViTConfig", {**IMAGE, "patch_size": 16, "hidden_size": 64, "num_hidden_layers": 2,
                                                       "num_attention_heads": 4, "intermediate_size": 128}),
    "swin": ("SwinForImageClassification", "SwinConfig", {**IMAGE, "patch_size": 4, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2],
                                                          "window_size": 4}),
    "opt": ("OPTForCausalLM", "OPTConfig", {"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                            "ffn_dim": 128, "word_embed_proj_dim": 64, "max_position_embeddings": 64}),
    "electra": ("ElectraForSequenceClassification", "ElectraConfig", {**TEXT, "embedding_size": 64, "num_attention_heads": 4, "num_labels": 3}),
    "distilbert": ("DistilBertForSequenceClassification", "DistilBertConfig", {"vocab_size": 100, "dim": 64, "n_layers": 2, "n_heads": 4,
                                                                                "hidden_dim": 128, "num_labels": 3}),
    "gpt_neo": ("GPTNeoForCausalLM", "GPTNeoConfig", {"vocab_size": 100, "hidden_size": 64, "num_layers": 2, "num_heads": 4,
                                                      "attention_types": [[["global", "local"], 1]], "max_position_embeddings": 64}),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", {**TEXT, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}),
    "stablelm": ("StableLmForCausalLM", "StableLmConfig", {**TEXT, "num_attention_heads": 4, "num_key_value_heads": 2}),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", {**TEXT, "num_attention_heads": 4, "max_position_embeddings": 64}),
    "phi": ("PhiForCausalLM", "PhiConfig", {**TEXT, "num_attention_heads": 4, "max_position_embeddings": 64}),
    "granite": ("GraniteForCausalLM", "GraniteConfig", {**TEXT, "num_attention_heads": 4, "num_key_value_heads": 2}),
    "cohere": ("CohereForCausalLM", "CohereConfig", {**TEXT, "num_attention_heads": 4, "num_key_value_heads": 2}),
    "roberta": ("RobertaForSequenceClassification", "RobertaConfig", {**TEXT, "num_attention_heads": 4, "num_labels": 3,
                                                                      "max_position_embeddings": 70}),
    "deberta_v2": ("DebertaV2ForSequenceClassification", "DebertaV2Config", {**TEXT, "num_attention_heads": 4, "num_labels": 3}),
}


def row(name: str, ratio: float) -> list:
    import transformers

    model_cls, config_cls, options = ZOO[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**options)).eval()
    text = "vocab_size" in options
    x = torch.randint(0, 100, (1, 8)) if text else torch.randn(1, 3, 64, 64)
    graph = fxprune.analyze(model, x)
    reasons = collections.Counter(r.split(" at node ")[0][:70] for g in graph.groups for r in g.frozen
                                  if not r.startswith(("model input", "model output")))
    t = time.perf_counter()
    try:
        pruned = fxprune.compile(model, example_inputs=x, ratio=ratio)
    except fxprune.TargetUnreachableError as exc:
        pruned = fxprune.compile(model, example_inputs=x, target_gflops=exc.smallest_gflops * 1.0001)
    seconds = time.perf_counter() - t
    before, after = fxprune.report(pruned).flops
    frozen = "; ".join(f"{n}x {r}" for r, n in reasons.most_common()) or "-"
    return [name, model_cls, len(graph.groups), len(graph.prunable_groups), frozen, f"{2 * before / 1e6:.2f}", f"{2 * after / 1e6:.2f}",
            f"{1 - after / before:.0%}", f"{seconds:.1f}", type(pruned).__name__, type(pruned(x)).__name__]


LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 64, "vocab_size": 128256, "tie_word_embeddings": True, "rope_theta": 500000.0, "max_position_embeddings": 4096}


def tokens_per_second(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return new_tokens / (time.perf_counter() - t)


def decoder(rounds: int, new_tokens: int) -> None:
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_1B)).eval()
    prompt = torch.randint(0, LLAMA_1B["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    graph = fxprune.analyze(model, prompt)
    analyzed = time.perf_counter() - t
    keep = {}
    for g in graph.prunable_groups:
        names = {(m.name.rpartition(".")[0].rpartition(".")[2], m.dim) for m in g.members}
        if ("k_proj", 0) in names:
            keep[g.id] = list(range(g.width * 3 // 4))
        elif ("up_proj", 0) in names:
            keep[g.id] = list(range(round(g.width * 0.6 / 64) * 64))
    t = time.perf_counter()
    pruned = fxprune.apply_plan(model, fxprune.Plan(keep), example_inputs=prompt)
    prune_s = time.perf_counter() - t
    speeds: dict[str, list[float]] = {"original": [], "pruned": []}
    for m in (model, pruned):  # warm-up
        tokens_per_second(m, prompt, 4)
    for _ in range(rounds):
        for name, m in (("original", model), ("pruned", pruned)):
            speeds[name].append(tokens_per_second(m, prompt, new_tokens))
    c = pruned.config
    before, after = (sum(p.numel() for p in m.parameters()) for m in (model, pruned))
    tps = {k: statistics.median(v) for k, v in speeds.items()}
    print(tabulate([[type(pruned).__name__, f"{c.num_attention_heads}/{c.num_key_value_heads} heads, MLP {c.intermediate_size}",
                     f"{analyzed:.0f}", f"{prune_s:.0f}", f"{before / 1e6:.0f}", f"{after / 1e6:.0f}", f"{tps['original']:.2f}",
                     f"{tps['pruned']:.2f}", f"{tps['pruned'] / tps['original']:.2f}x"]],
                   ["result", "pruned config", "analyze s", "prune s", "M params", "after", "tokens/s", "after", "ratio"], tablefmt="github"))
    print(f"{rounds} rounds of generate(max_new_tokens={new_tokens}) from a 16-token prompt, in turns; per round (original, pruned): "
          + ", ".join(f"({a:.2f}, {b:.2f})" for a, b in zip(speeds["original"], speeds["pruned"])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(ZOO))
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--decoder", action="store_true", help="the Llama-3.2-1B-shaped decoder instead of the zoo")
    ap.add_argument("--rounds", type=int, default=5, help="--decoder: generate() runs of each model, in turns")
    ap.add_argument("--new-tokens", type=int, default=32, help="--decoder: tokens each generate() makes")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("fxprune").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    if args.decoder:
        decoder(args.rounds, args.new_tokens)
        return
    rows = [row(name, args.ratio) for name in args.models.split(",")]
    print(tabulate(rows, ["model", "class", "groups", "prunable", "frozen besides input and output", "MFLOPs", "after", "cut",
                          "compile s", "result", "result returns"], tablefmt="github"))


if __name__ == "__main__":
    main()
