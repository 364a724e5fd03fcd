"""Hugging Face transformers models through fxprune: what couples, what stays frozen and why.

Each model is built from a small config with random weights (nothing is downloaded) and compiled
directly, its ``ModelOutput`` and all, at ``ratio=0.5`` with verification; a model that cannot reach it
is reported with the most its prunable groups allow. Printed per model: dependency groups, how many
are prunable, frozen groups other than the model's input and output with their reasons, FLOPs before and
after, compile time and the output type of the result.

    python benchmarks/hf.py                 # the zoo (docs/benchmarks.md)
    python benchmarks/hf.py --models gpt2,bert
"""

from __future__ import annotations

import argparse
import collections
import logging
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
    "segformer": ("SegformerForSemanticSegmentation", "SegformerConfig", {
        "num_encoder_blocks": 2, "depths": [1, 1], "sr_ratios": [2, 1], "hidden_sizes": [16, 32], "num_attention_heads": [1, 2],
        "decoder_hidden_size": 32, "num_labels": 3, "strides": [4, 2], "patch_sizes": [7, 3], "mlp_ratios": [2, 2]}),
    "convnextv2": ("ConvNextV2ForImageClassification", "ConvNextV2Config", {"num_stages": 2, "hidden_sizes": [16, 32], "depths": [1, 1], "num_labels": 3}),
    "vit": ("ViTForImageClassification", "ViTConfig", {**IMAGE, "patch_size": 16, "hidden_size": 64, "num_hidden_layers": 2,
                                                       "num_attention_heads": 4, "intermediate_size": 128}),
    "swin": ("SwinForImageClassification", "SwinConfig", {**IMAGE, "patch_size": 4, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2],
                                                          "window_size": 4}),
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
            f"{1 - after / before:.0%}", f"{seconds:.1f}", type(pruned(x)).__name__]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(ZOO))
    ap.add_argument("--ratio", type=float, default=0.5)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("fxprune").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    rows = [row(name, args.ratio) for name in args.models.split(",")]
    print(tabulate(rows, ["model", "class", "groups", "prunable", "frozen besides input and output", "MFLOPs", "after", "cut",
                          "compile s", "result returns"], tablefmt="github"))


if __name__ == "__main__":
    main()
