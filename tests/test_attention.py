"""Transformers prune whole: attention heads are atoms, head counts are rewritten, FLOPs are honest.

For each model: analyze() freezes only the model's input and output; compile(ratio=0.5) verifies,
keeps the output shape, removes at least a quarter of the attention projections' weights, and the
pruned model exports with torch.export.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import fxprune
from conftest import lively

ATTENTION_WEIGHTS = ("qkv.weight", "in_proj_weight", "to_qkv.weight", "proj.weight", "out_proj.weight", "merge.weight",
                     "project.0.weight")

MODELS = {  # name -> input size
    "vit_b_16": 224, "swin_t": 112, "swin_v2_t": 112, "maxvit_t": 224,
    "swin3d_t": 112, "mvit_v2_s": 224, "timm:vit_tiny_patch16_224": 224, "timm:deit_small_patch16_224": 224, "timm:swin_tiny_patch4_window7_224": 224,
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name.startswith("timm:"):
        timm = pytest.importorskip("timm")
        model = timm.create_model(name[5:], pretrained=False)
    else:
        model = torchvision.models.get_model(name, weights=None)  # video models take (B, 3, T, H, W)
    for m in model.modules():  # torchvision's ViT starts with a zero head: give every output a say
        if isinstance(m, nn.Linear) and not m.weight.any():
            nn.init.normal_(m.weight, std=0.02)
    return lively(model.eval())


def attention_numel(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ("attn" in n or "attention" in n) and n.endswith(ATTENTION_WEIGHTS))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_transformer_prunes_whole(name: str) -> None:
    model = build(name)
    frames = {"swin3d_t": (8,), "mvit_v2_s": (16,)}.get(name, ())
    x = torch.randn(1, 3, *frames, MODELS[name], MODELS[name], generator=torch.Generator().manual_seed(1))
    graph = fxprune.analyze(model, x)
    frozen = sorted(r for g in graph.groups for r in g.frozen)
    assert frozen == ["model input x", "model output"], frozen
    pruned = fxprune.compile(model, ratio=0.5, example_inputs=x)
    verified = pruned.meta["fxprune"]["verified"]
    assert verified["max_abs_error"] <= verified["tolerance"]
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape
    before, after = attention_numel(model), attention_numel(pruned)
    assert before > 0 and after <= 0.75 * before, (before, after)
    exported = torch.export.export(pruned, (x,))
    torch.testing.assert_close(exported.module()(x), pruned(x), rtol=1e-4, atol=1e-5)


def test_heads_are_removed_whole_and_head_counts_rewritten() -> None:
    """nn.MultiheadAttention with 4 heads of 8: pruning keeps multiples of 8 rows in q, k and v."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(16, 32)
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.out = nn.Linear(32, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            a, _ = self.attn(h, h, h, need_weights=False)
            return self.out(h + a)

    model = Block().eval()
    x = torch.randn(2, 7, 16)
    graph = fxprune.analyze(model, x)
    heads = [g for g in graph.groups if any(m.name == "attn.in_proj_weight" and m.dim == 0 for m in g.members)
             and not any(m.name == "inp.weight" for m in g.members)]
    assert len(heads) == 1 and heads[0].width == 4
    pruned = fxprune.compile(model, ratio=0.5, example_inputs=x)
    rows = dict(pruned.named_parameters())["attn.in_proj_weight"].shape[0]
    assert rows % (3 * 8) == 0 and rows < 96
    assert model.attn.num_heads == 4 and model.attn.in_proj_weight.shape == (96, 32)  # the user's model is untouched


def test_sdpa_attention_with_unbind() -> None:
    """timm's pattern: one qkv projection, reshape to heads, unbind, scaled_dot_product_attention."""

    class Attention(nn.Module):
        def __init__(self, dim: int = 24, heads: int = 3) -> None:
            super().__init__()
            self.heads = heads
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
            return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(6, 24)
            self.attn = Attention()
            self.head = nn.Linear(24, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            return self.head(h + self.attn(h))

    model = Net().eval()
    x = torch.randn(2, 5, 6)
    graph = fxprune.analyze(model, x)
    assert sorted(r for g in graph.groups for r in g.frozen) == ["model input x", "model output"]
    pruned = fxprune.compile(model, ratio=0.4, example_inputs=x)
    assert dict(pruned.named_parameters())["attn.qkv.weight"].shape[0] % 3 == 0


def test_vit_flops_count_attention_like_the_unfused_path() -> None:
    model = torchvision.models.vit_b_16(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as unfused, torch.enable_grad():
        model.train()(x)
    model.eval()
    counted = fxprune.count_flops(model, x)
    assert abs(counted - unfused.get_total_flops()) <= 0.01 * unfused.get_total_flops()


def test_l1_scores_a_head_by_all_its_channels() -> None:
    """The head whose q, k and v rows are smallest is the one l1 removes."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    with torch.no_grad():
        for part in range(3):  # head 2's rows of q, k and v: 8 rows each
            attn.in_proj_weight[part * 32 + 16:part * 32 + 24] *= 0.01

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = attn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.attn(x, x, x, need_weights=False)[0]

    x = torch.randn(2, 6, 32)
    graph = fxprune.analyze(Block(), x)
    heads = next(g for g in graph.groups if g.width == 4)
    plan = fxprune.Plan({heads.id: [0, 1, 3]})
    pruned_by_plan = fxprune.apply_plan(Block(), plan, example_inputs=x)
    pruned = fxprune.compile(Block(), strategy=fxprune.Strategy(selector="l1", round_to=1),
                             target_gflops=fxprune.count_flops(pruned_by_plan, x) / 1e9, example_inputs=x)
    kept = dict(pruned.named_parameters())["attn.in_proj_weight"]
    torch.testing.assert_close(kept, dict(pruned_by_plan.named_parameters())["attn.in_proj_weight"])


class Decoder(nn.Module):
    """A decoder layer as Llama writes it: rotary embeddings from a frequency buffer, 4 query heads
    sharing 2 key/value heads, either repeated (``repeat_kv``) or read by SDPA's ``enable_gqa``."""

    def __init__(self, gqa_in_sdpa: bool, dim: int = 32, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.gqa_in_sdpa = heads, kv_heads, dim // heads, gqa_in_sdpa
        self.embed = nn.Linear(6, dim)
        self.q = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(heads * self.head_dim, dim, bias=False)
        self.head = nn.Linear(dim, 3)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim), persistent=False)

    @staticmethod
    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        b, n, _ = h.shape
        angles = torch.arange(n, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((angles, angles), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        q = self.q(h).view(b, n, -1, self.head_dim).transpose(1, 2)
        k = self.k(h).view(b, n, -1, self.head_dim).transpose(1, 2)
        v = self.v(h).view(b, n, -1, self.head_dim).transpose(1, 2)
        q, k = q * cos + self.rotate_half(q) * sin, k * cos + self.rotate_half(k) * sin
        if self.gqa_in_sdpa:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            rep = self.heads // self.kv_heads
            k, v = (t[:, :, None].expand(b, self.kv_heads, rep, n, self.head_dim).reshape(b, self.heads, n, self.head_dim) for t in (k, v))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(h + self.o(a.transpose(1, 2).reshape(b, n, -1)))


@pytest.mark.parametrize("gqa_in_sdpa", [False, True], ids=["repeat_kv", "enable_gqa"])
def test_a_key_value_head_and_its_query_heads_are_one_atom_and_rotary_embeddings_keep_heads(gqa_in_sdpa: bool) -> None:
    torch.manual_seed(0)
    model = Decoder(gqa_in_sdpa).eval()
    x = torch.randn(2, 5, 6)
    graph = fxprune.analyze(model, x)
    assert sorted(r for g in graph.groups for r in g.frozen) == ["model input x", "model output"]
    heads = next(g for g in graph.groups if any(m.name == "k.weight" and m.dim == 0 for m in g.members))
    assert heads.width == 2 and {m.name for m in heads.members} == {"q.weight", "k.weight", "v.weight", "o.weight"}
    assert "inv_freq" not in {m.name for g in graph.groups for m in g.members}  # positions within a head, not channels
    pruned = fxprune.apply_plan(model, fxprune.Plan({heads.id: [1]}), example_inputs=x)  # verified against the masked original
    params = dict(pruned.named_parameters())
    assert params["q.weight"].shape[0] == 16 and params["k.weight"].shape[0] == 8 and params["o.weight"].shape[1] == 16
    with torch.no_grad():  # the kept query heads are those that read the kept key/value head
        torch.testing.assert_close(params["q.weight"], model.q.weight[16:], rtol=0, atol=0)


def test_single_head_attention_prunes_head_dim_and_keeps_its_scale() -> None:
    """One head: q and k lose the same channels, v its own; the default scale 1/sqrt(head_dim) stays as it was."""

    class OneHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(6, 16)
            self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            q, k, v = (p(h).unsqueeze(1) for p in (self.q, self.k, self.v))  # (B, 1 head, N, 16)
            return self.head(h + self.o(F.scaled_dot_product_attention(q, k, v).squeeze(1)))

    torch.manual_seed(0)
    model = OneHead().eval()
    x = torch.randn(2, 5, 6)
    graph = fxprune.analyze(model, x)
    assert sorted(r for g in graph.groups for r in g.frozen) == ["model input x", "model output"]
    qk = next(g for g in graph.groups if any(m.name == "q.weight" and m.dim == 0 for m in g.members))
    assert {m.name for m in qk.members} >= {"q.weight", "k.weight"} and "v.weight" not in {m.name for m in qk.members}
    pruned = fxprune.compile(model, ratio=0.5, example_inputs=x)  # verification compares with the masked original
    assert dict(pruned.named_parameters())["q.weight"].shape[0] < 16
