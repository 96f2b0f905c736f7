"""Look inside: what the analysis finds in a hand-written model, what a pass would do (and why it
refuses when it must), the rewritten code of a raw FX graph, and a kernel as a torch.library op.
A few seconds on CPU.

    .venv/bin/python examples/inspect_graph.py
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import compile_sparse
import compile_sparse.codegen.ops  # noqa: F401  (registers the torch.ops.compile_sparse ops)
from compile_sparse import models


class LastLogits(nn.Module):
    """nanoGPT (models.nanogpt: matmul-softmax attention, a causal buffer) that returns the last
    position's logits only, as a generation step needs."""

    def __init__(self, gpt: nn.Module):
        super().__init__()
        self.gpt = gpt

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.gpt(idx)[:, -1]  # (B, vocab)


class Block(nn.Module):
    """A pre-norm transformer block written by hand: fused qkv, SDPA, ReLU MLP."""

    def __init__(self, dim: int = 64, heads: int = 4):
        super().__init__()
        self.heads, self.norm = heads, nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, dim) -> (B, T, dim)."""
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, H, T, dim / H)
        x = x + self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2))
        return x + self.down(F.relu(self.up(x)))


class Inline(torch.fx.Tracer):
    """Trace through submodules, so that projections appear as F.linear calls on parameters."""

    def is_leaf_module(self, module: nn.Module, name: str) -> bool:
        return False


def main() -> None:
    torch.manual_seed(0)
    gpt = models.nanogpt(layers=3)
    idx = torch.randint(0, 128, (1, 32))
    tokens = {"method": "lazyllm", "layers": [1], "keep_ratios": [0.5], "window": 4}

    print("1. nanoGPT returning logits for every position: token dropping is refused, with the reason")
    print(compile_sparse.explain(gpt, idx, options={"tokens": tokens}))

    print("\n2. the same model returning the last position only: layers 1 and 2 see half the tokens")
    print(compile_sparse.explain(LastLogits(gpt), idx, options={"tokens": tokens}))

    print("\n3. a raw FX graph (torch.fx, not Dynamo) through compile_sparse.transform: half the MLP neurons go")
    block = Block().eval()
    gm = torch.fx.GraphModule(block, Inline().trace(block))
    x = torch.randn(1, 32, 64)
    pruned = compile_sparse.transform(gm, [x], {"prune": {"method": "magnitude", "mlp_ratio": 0.5}})
    lines = [line.strip() for line in pruned.code.splitlines() if "pruned_" in line and "linear" in line]
    print("\n".join(f"   {line[:110]}" for line in lines))
    print(f"   output {tuple(pruned(x).shape)}, weights now: "
          f"{[tuple(getattr(pruned, n).shape) for n, _ in pruned.named_buffers() if n.startswith('pruned_')]}")

    print("\n4. a kernel as a torch.library op (on CPU: its torch reference; on CUDA: the Triton kernel)")
    q, k, v = torch.randn(1, 8, 1, 64), torch.randn(1, 2, 100, 64), torch.randn(1, 2, 100, 64)
    out = torch.ops.compile_sparse.decode_attention(q, k, v, 64 ** -0.5)
    reference = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    print(f"   torch.ops.compile_sparse.decode_attention: {tuple(out.shape)}, "
          f"max difference to SDPA {(out - reference).abs().max().item():.1e}")


if __name__ == "__main__":
    main()
