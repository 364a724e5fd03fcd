"""Is a pruned language model still a good language model? Held-out perplexity of a small trained decoder.

A Llama-shaped decoder (``LlamaForCausalLM``: 4 layers, hidden 128, 8 query heads over 4 key/value
heads, MLP 384, byte-level vocabulary of 256) is trained here on the Python source of the ``torch``
package as installed (PyPI ``torch``: every ``.py`` file under ``torch/nn``, read from site-packages;
every tenth file, in sorted order, is held out). Nothing is downloaded. The trained weights are cached
on disk (``$FXPRUNE_CACHE_DIR``, default ``~/.cache/fxprune``, under ``benchmarks/``), keyed by the
config, the training settings, the torch version and the corpus, so a rerun skips training.

The decoder is then pruned with ``fxprune.compile`` to 20%, 35% and 50% fewer parameters in its decoder
layers (the FLOPs ``ratio=`` whose result comes nearest, of those a bisection tries: once for the
equal-width rows, where per-group budgets give every selector the same widths, and once for the global
ones), with each selector of ``--selectors``
(``wanda+comp``: wanda with ``compensate=True``, the removed channels' calibration means folded into the
biases of the output projections); the data-driven ones get the same calibration windows of training text (taylor also the next-byte
cross-entropy as ``loss_fn``). For each row: held-out bits per byte and byte-level perplexity
(``2 ** bits``) without healing and after the same short healing (distillation: KL divergence to the
dense model's next-byte distribution, the same batches and steps for every row), the decoder layers'
parameters kept, decode tokens/s in ``generate()`` (greedy, with the KV cache; for a graph result, whose
layers differ in width, on a stand-in of the class holding its tensors, marked ``*``) and prefill
latency, each against the original in turns, and the class ``compile`` returned.

    python benchmarks/llm.py --quick --plot docs/llm_perplexity.png   # docs/results.md
    python benchmarks/llm.py --quick --seed 1
    python benchmarks/llm.py             # longer training and healing
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate

import fxprune
from fxprune.selection.selectors import data_driven, takes_loss
from hf import tokens_per_second

CONFIG = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
          "vocab_size": 256, "max_position_embeddings": 256}
SEQ = 128
BATCH = 16
SELECTORS = ("uniform", "random", "l2", "taylor", "wanda", "wanda+comp", "wanda+global", "depth1", "depth2", "decode1.3", "peer")
"""``NAME+comp``: selector NAME with ``compensate=True`` (the removed channels' means folded into the biases);
``NAME+global``: ``mode="global"`` (widths allocated across layers by the scores, so layers differ);
``depthN``: ``fxprune.drop_layers(model, N, calibration)`` (the N least influential layers removed);
``decodeX``: ``fxprune.drop_layers(..., speedup=X)``, the fewest layers for X times the decode tokens/s;
``peer``: torch-pruning's LLM recipe (``peer``), bounded by ``--peer-timeout``."""
PROMPT, NEW_TOKENS, ROUNDS = SEQ, 32, 5  # the prompt has the example's length: a graph result takes no other
FEWER_PARAMS = (0.2, 0.35, 0.5)
SETTINGS = {True: {"train_steps": 800, "heal_steps": 40, "eval_windows": 256, "calibration_batches": 8},
            False: {"train_steps": 3000, "heal_steps": 150, "eval_windows": 1024, "calibration_batches": 32}}


def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """The bytes of torch/nn's Python source: (training text, held-out text: every tenth file)."""
    files = sorted((pathlib.Path(torch.__file__).parent / "nn").rglob("*.py"))
    held = [f for i, f in enumerate(files) if i % 10 == 9]
    train = [f for i, f in enumerate(files) if i % 10 != 9]

    def text(fs: list[pathlib.Path]) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"".join(f.read_bytes() for f in fs)), dtype=torch.uint8).long()

    return text(train), text(held)


def windows(text: torch.Tensor, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """``count`` windows of SEQ + 1 bytes: at random offsets, or the first non-overlapping ones (``generator`` None)."""
    if generator is None:
        return text[: count * (SEQ + 1)].view(count, SEQ + 1)
    starts = torch.randint(0, text.numel() - SEQ - 1, (count,), generator=generator)
    return torch.stack([text[s : s + SEQ + 1] for s in starts.tolist()])


def dense(train: torch.Tensor, steps: int, seed: int) -> torch.nn.Module:
    """The trained decoder, from the cache when it holds these settings."""
    import transformers

    config = transformers.LlamaConfig(**CONFIG)
    key = json.dumps({"config": CONFIG, "steps": steps, "seed": seed, "batch": BATCH, "seq": SEQ, "torch": torch.__version__,
                      "corpus": hashlib.sha256(train.to(torch.uint8).numpy().tobytes()).hexdigest()}, sort_keys=True)
    root = pathlib.Path(os.environ.get("FXPRUNE_CACHE_DIR", pathlib.Path.home() / ".cache" / "fxprune"))
    path = root / "benchmarks" / f"llm-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    if path.exists():
        model.load_state_dict(torch.load(path))
        print(f"trained weights from {path}")
        return model.eval()
    start = time.perf_counter()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        x = windows(train, BATCH, g)
        loss = F.cross_entropy(model(x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 200 == 0 or step == steps - 1:
            print(f"  train step {step}: {loss.item() / math.log(2):.3f} bits/byte")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    print(f"trained {steps} steps in {time.perf_counter() - start:.0f} s; weights cached at {path}")
    return model.eval()


@torch.no_grad()
def bits_per_byte(model: torch.nn.Module, held: torch.Tensor) -> float:
    """Mean next-byte cross-entropy over the held-out windows, in bits."""
    model.eval()
    total = sum(F.cross_entropy(model(x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
                for x in held.split(64))
    return total / (held.shape[0] * SEQ) / math.log(2)


def heal(student: torch.nn.Module, teacher: torch.nn.Module, train: torch.Tensor, steps: int, seed: int) -> torch.nn.Module:
    """``student`` after ``steps`` of ``fxprune.distillation`` (KL to the teacher's next-byte distributions)."""
    g = torch.Generator().manual_seed(seed + 1)
    return fxprune.distillation(teacher, [windows(train, BATCH, g)[:, :-1] for _ in range(steps)])(student).eval()


@torch.no_grad()
def speed(model: torch.nn.Module, decoder: torch.nn.Module, original: torch.nn.Module, prompt: torch.Tensor) -> tuple[float, float]:
    """(decode tokens/s, prefill latency) over ``original``'s, as ratios of medians of ROUNDS runs taken in
    turns after one warm-up: ``generate()`` of NEW_TOKENS greedy tokens with the KV cache after ``prompt``
    by ``decoder`` (``model``, or its stand-in with ``generate``), and one forward of ``model`` over ``prompt``."""
    def prefill(m: torch.nn.Module) -> float:
        start = time.perf_counter()
        m(prompt)
        return time.perf_counter() - start

    def decode(m: torch.nn.Module) -> float:
        return tokens_per_second(m, prompt, NEW_TOKENS)

    model.eval()
    timed = [("d0", decode, original), ("d1", decode, decoder), ("p0", prefill, original), ("p1", prefill, model)]
    runs: dict[str, list[float]] = {key: [] for key, _, _ in timed}
    for r in range(ROUNDS + 1):
        for key, fn, m in timed:
            value = fn(m)
            if r:  # the first round warms up
                runs[key].append(value)
    med = {k: statistics.median(v) for k, v in runs.items()}
    return med["d1"] / med["d0"], med["p0"] / med["p1"]


def decoder_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.model.layers.parameters())


def ratio_for(model: torch.nn.Module, ids: torch.Tensor, fewer: float, **options) -> tuple[float, float]:
    """(FLOPs ``ratio=``, share removed): of the ratios tried by bisection, the one whose result (compiled with
    ``options``) removes the share of decoder-layer parameters nearest ``fewer``; widths move in steps, so
    the nearest may lie on either side."""
    lo, hi, full, tried = 0.3 * fewer, fewer, decoder_params(model), {}
    for _ in range(8):
        mid = (lo + hi) / 2
        tried[mid] = 1 - decoder_params(fxprune.compile(model, example_inputs=ids, ratio=mid, verify=False, **options)) / full
        lo, hi = (mid, hi) if tried[mid] < fewer else (lo, mid)
    best = min(tried, key=lambda r: abs(tried[r] - fewer))
    return best, tried[best]


def uneven_twin(model: torch.nn.Module, pruned: torch.fx.GraphModule, prompt: torch.Tensor) -> torch.nn.Module:
    """A copy of ``model``'s class holding ``pruned``'s tensors, each module at its own width: a stand-in
    that has ``generate()`` for a graph result whose layers differ in width (a ``LlamaConfig`` states one
    width for all layers, so ``compile`` returns the graph). Checked against the graph on ``prompt``."""
    twin = copy.deepcopy(model)
    for name, tensor in pruned.named_parameters():
        owner, _, leaf = name.rpartition(".")
        module = twin.get_submodule(owner)
        setattr(module, leaf, torch.nn.Parameter(tensor.detach().clone()))
        if isinstance(module, torch.nn.Linear):
            module.out_features, module.in_features = module.weight.shape
    for layer in twin.model.layers:
        attention = layer.self_attn
        attention.num_key_value_groups = attention.q_proj.out_features // attention.k_proj.out_features
    with torch.no_grad():
        torch.testing.assert_close(twin(prompt).logits, pruned(prompt).logits, rtol=1e-4, atol=1e-4)
    return twin.eval()


def peer(quick: bool, seed: int, fewer: float, timeout: int) -> dict:
    """Torch-pruning's LLM recipe as its example states it (L2 magnitude, ``fewer`` for channels and heads
    alike, every layer the same, no calibration or healing), run in a subprocess stopped after ``timeout``
    seconds: its held-out bits per byte, or what happened."""
    command = [sys.executable, __file__, "--peer-worker", str(fewer), "--seed", str(seed)] + ["--quick"] * quick
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as stopped:
        out = stopped.stdout.decode() if isinstance(stopped.stdout, bytes) else stopped.stdout or ""
        stage = [line.removeprefix("stage: ") for line in out.splitlines() if line.startswith("stage: ")]
        return {"error": f"no result in {timeout} s ({stage[-1] if stage else 'starting'})", "seconds": time.perf_counter() - start}
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:80], "seconds": time.perf_counter() - start}
    return json.loads(lines[-1]) | {"seconds": time.perf_counter() - start}


def peer_worker(quick: bool, seed: int, fewer: float) -> None:
    """The subprocess of ``peer``: prune in place, print one JSON line."""
    import torch_pruning as tp  # noqa: PLC0415 - the peer, only here

    s = SETTINGS[quick]
    train, held_text = corpus()
    model = dense(train, s["train_steps"], seed)
    full = decoder_params(model)
    heads = {}
    for layer in model.model.layers:
        a = layer.self_attn
        heads |= {a.q_proj: CONFIG["num_attention_heads"], a.k_proj: CONFIG["num_key_value_heads"], a.v_proj: CONFIG["num_key_value_heads"]}
    print("stage: building its dependency graph", flush=True)
    pruner = tp.pruner.MetaPruner(model, torch.zeros(1, SEQ, dtype=torch.long), importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=fewer, ignored_layers=[model.lm_head], num_heads=heads, prune_num_heads=True,
                                  prune_head_dims=False, head_pruning_ratio=fewer, output_transform=lambda out: out.logits)
    print("stage: pruning", flush=True)
    pruner.step()
    print("stage: evaluating", flush=True)
    held = windows(held_text, min(s["eval_windows"], held_text.numel() // (SEQ + 1)), None)
    print(json.dumps({"bits": bits_per_byte(model, held), "removed": 1 - decoder_params(model) / full}))


def run(quick: bool, selectors: list[str], seed: int, plot: str | None, peer_timeout: int) -> None:
    s = SETTINGS[quick]
    train, held_text = corpus()
    print(f"corpus: torch {torch.__version__} torch/nn/**/*.py, {train.numel() / 1e6:.2f} MB training, {held_text.numel() / 1e6:.2f} MB held out")
    model = dense(train, s["train_steps"], seed)
    held = windows(held_text, min(s["eval_windows"], held_text.numel() // (SEQ + 1)), None)
    base = bits_per_byte(model, held)
    print(f"dense: {base:.3f} bits/byte, perplexity {2 ** base:.2f}, {decoder_params(model)} decoder-layer parameters")
    g = torch.Generator().manual_seed(seed + 2)
    calibration = [(x[:, :-1], x[:, 1:]) for x in (windows(train, 8, g) for _ in range(s["calibration_batches"]))]
    ids = calibration[0][0][:1]

    def loss_fn(output: object, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output.logits.flatten(0, 1), target.flatten())

    prompt = held[:1, :PROMPT]
    rows, found = [], []

    def row(fewer: float, name: str, ratio: str, pruned: torch.nn.Module, seconds: float) -> None:
        decoder = pruned if hasattr(pruned, "generate") else uneven_twin(model, pruned, prompt)
        decode, prefill = speed(pruned, decoder, model, prompt)
        bits = bits_per_byte(pruned, held)
        healed = bits_per_byte(heal(pruned, model, train, s["heal_steps"], seed), held)
        removed = 1 - decoder_params(pruned) / decoder_params(model)
        found.append((removed, name, bits, healed))
        rows.append([f"{fewer:.0%}", name, f"{removed:.1%}", ratio,
                     f"{bits:.3f}", f"{2 ** bits:.2f}", f"{bits / base - 1:+.0%}", f"{healed:.3f}", f"{2 ** healed:.2f}",
                     f"{healed / base - 1:+.1%}", f"{decode:.2f}x" + ("" if decoder is pruned else "*"), f"{prefill:.2f}x",
                     type(pruned).__name__, f"{seconds:.1f}"])
        print("  " + " | ".join(rows[-1]), flush=True)

    widths = [n for n in selectors if not n.startswith(("depth", "decode", "peer"))]
    for fewer in FEWER_PARAMS if widths else ():
        ratios = {}
        for name in widths:
            selector, options = name.split("+")[0], set(name.split("+")[1:])
            data = {"calibration": calibration} if selector in data_driven() or "comp" in options else {}
            data |= {"loss_fn": loss_fn} if takes_loss(selector) else {}
            data |= {"mode": "global"} if "global" in options else {}
            allocation = {"mode": "global", "selector": selector, "calibration": calibration} if "global" in options else {}
            key = f"global {selector}" if allocation else "equal"
            if key not in ratios:  # equal widths: one ratio for every selector; global: its own
                ratios[key] = ratio_for(model, ids, fewer, **allocation)[0]
            start = time.perf_counter()
            pruned = fxprune.compile(model, example_inputs=ids, ratio=ratios[key], selector=selector, seed=seed, compensate="comp" in options, **data)
            row(fewer, name, f"{ratios[key]:.3f}", pruned, time.perf_counter() - start)
    layers = CONFIG["num_hidden_layers"]
    for name in [n for n in selectors if n.startswith(("depth", "decode"))]:
        start = time.perf_counter()
        if name.startswith("depth"):
            pruned = fxprune.drop_layers(model, int(name.removeprefix("depth")), calibration)
        else:
            pruned = fxprune.drop_layers(model, calibration=calibration, speedup=float(name.removeprefix("decode")), example_inputs=prompt,
                                         new_tokens=NEW_TOKENS)
            claimed = pruned.meta["fxprune"]["depth"]["decode"]
            print(f"  {name}: {len(pruned.meta['fxprune']['depth']['dropped'])} layers dropped, decode {claimed['speedup']:.3g}x claimed "
                  f"({claimed['interval'][0]:.3g}-{claimed['interval'][1]:.3g}x); re-measured in the row below")
        row(1 - pruned.config.num_hidden_layers / layers, name, "-", pruned, time.perf_counter() - start)
    for fewer in FEWER_PARAMS if "peer" in selectors else ():
        out = peer(quick, seed, fewer, peer_timeout)
        if "error" in out:  # the same dependency graph at every ratio
            rows.append([f"{fewer:.0%}", "peer", *["-"] * 10, out["error"], f"{out['seconds']:.0f}"])
            print("  " + " | ".join(rows[-1]), flush=True)
            break
        rows.append([f"{fewer:.0%}", "peer", f"{out['removed']:.1%}", "-", f"{out['bits']:.3f}", f"{2 ** out['bits']:.2f}",
                     f"{out['bits'] / base - 1:+.0%}", *["-"] * 5, "LlamaForCausalLM", f"{out['seconds']:.0f}"])
        print("  " + " | ".join(rows[-1]), flush=True)
    print(f"\ndense: {base:.3f} bits/byte (perplexity {2 ** base:.2f}); healing: {s['heal_steps']} steps of distillation; "
          f"decode: {NEW_TOKENS} greedy tokens after {PROMPT} bytes, prefill: one forward over them, each against the original "
          f"in turns (medians of {ROUNDS}), {torch.get_num_threads()} thread(s)\n")
    print(tabulate(rows, headers=["fewer params", "selector", "decoder params removed", "FLOPs ratio=", "bits/byte", "ppl", "vs dense",
                                  "healed bits/byte", "healed ppl", "healed vs dense", "decode tok/s", "prefill speed-up", "class",
                                  "compile s"], tablefmt="github"))
    if plot:
        draw(found, base, plot)


def draw(found: list[tuple[float, str, float, float]], base: float, path: str) -> None:
    """Held-out bits per byte against the share of parameters removed, per selector, before and after healing."""
    import matplotlib  # noqa: PLC0415 - only for --plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, k, title in ((axes[0], 2, "before healing"), (axes[1], 3, "after healing (distillation)")):
        for name in dict.fromkeys(f[1] for f in found):
            points = [(f[0], f[k]) for f in found if f[1] == name]
            ax.plot([100 * x for x, _ in points], [y for _, y in points], marker="o", label=name)
        ax.axhline(base, color="black", linestyle=":", label="dense")
        ax.set(title=title, xlabel="decoder-layer parameters removed (%)", ylabel="held-out bits per byte")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter training, healing and evaluation (under 10 minutes on 2 CPU cores)")
    parser.add_argument("--selectors", default=",".join(SELECTORS), help="comma-separated selector names")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: two threads on two cores that "
                        "other work shares ran training several times slower here)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", metavar="PNG", help="draw bits per byte against parameters removed, per selector")
    parser.add_argument("--peer-timeout", type=int, default=60, help="seconds before the peer's run is stopped (default 60)")
    parser.add_argument("--peer-worker", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("fxprune").setLevel(logging.ERROR)  # the ratio search's notes on finer multiples
    if args.peer_worker is not None:
        peer_worker(args.quick, args.seed, args.peer_worker)
    else:
        run(args.quick, args.selectors.split(","), args.seed, args.plot, args.peer_timeout)


if __name__ == "__main__":
    main()
