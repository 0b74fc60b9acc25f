"""Memory per GPU of an AST run, by formula (docs/distributed.md), with the static terms checked against a real run.

Part 1 counts parameters exactly on the meta device (no weights are loaded) for a model config — LLaMA-2-7B's by
default — and prints each term of the per-GPU budget for W processes: fp32 master weights, gradients and AdamW
moments and the bool masks (all sharded by FSDP2), the bf16 teacher, the gathered blocks, the
activations saved for backward, the kept KD logits.

Part 2 checks the static terms: it trains the shipped SmolLM2-135M one step in one CPU process (the product's
sparsify + MaskedAdamW) and compares the bytes of the real parameters, gradients, optimizer state and mask buffers
with 4N, 4N, 8N and S.

    .venv/bin/python benchmarks/distributed_memory.py [--world 8] [--seq-len 4096] [--batch 1] [--skip-check]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

GB = 1e9
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)


def counts(config) -> dict:
    """N (all parameters) and S (weights of the sparse linear layers: every linear of the decoder blocks)."""
    import torch
    from transformers import AutoModelForCausalLM

    from semisparse.layers import select_layers, weight_matrix

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    layers = select_layers(model)
    s = sum(weight_matrix(m).numel() for m in layers.values())
    return {"N": n, "S": s, "layers": len(layers), "blocks": config.num_hidden_layers, "hidden": config.hidden_size,
            "vocab": config.vocab_size}


def budget(c: dict, world: int, seq_len: int, batch: int, checkpointing: bool, shard_teacher: bool) -> list:
    n, s, h, layers, v = c["N"], c["S"], c["hidden"], c["blocks"], c["vocab"]
    tokens = seq_len * batch
    rows = [
        ("student fp32 master weights (sharded)", 4 * n / world),
        ("fp32 gradients (sharded)", 4 * n / world),
        ("AdamW / AdamS moments (sharded)", 8 * n / world),
        ("masks, bool (sharded like their weights)", s / world),
        ("teacher bf16" + (" (sharded)" if shard_teacher else ", replicated"), 2 * n / (world if shard_teacher else 1)),
        ("one gathered block + the next (prefetch): bf16 weights, bool masks", 2 * (2 * n + s) / layers),
    ]
    if checkpointing:
        rows += [("block inputs saved (activation checkpointing)", 2 * h * tokens * layers),
                 ("one block recomputed in backward", 34 * h * tokens)]
    else:
        # No W*M term: SparseLinear keeps W and M for backward and rebuilds the product there (sparse_linear.py).
        rows += [("activations saved for backward (34*h bytes a token a layer)", 34 * h * tokens * layers)]
    kept = tokens * v <= 2**27
    rows.append(("KD logits " + ("kept (about five fp32 copies)" if kept else "chunked (1024-token chunks)"),
                 5 * 4 * (tokens if kept else 1024) * v))
    return rows


def check_static_terms() -> None:
    """One real training step of the shipped model in this process: its tensors' bytes vs the formula's terms."""
    import torch

    from semisparse.models import load_model
    from semisparse.train.optim import MaskedAdamW
    from semisparse.train.sparse_linear import param_masks, sparse_layers, sparsify

    net = load_model("default").model
    n = sum(p.numel() for p in net.parameters())
    sparsify(net, None, "2:4")
    s = sum(layer.weight.numel() for layer in sparse_layers(net).values())
    opt = MaskedAdamW(net.parameters(), lr=1e-5, masks=param_masks(net), srste_lambda=1e-4)
    ids = torch.randint(0, 1000, (1, 32))
    net(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    unique = {id(p): p for p in net.parameters()}.values()  # tied embeddings counted once, as N counts them
    measured = {
        "parameters (fp32)": (sum(p.numel() * p.element_size() for p in unique), 4 * n),
        "gradients (fp32)": (sum(p.grad.numel() * p.grad.element_size() for p in unique if p.grad is not None), 4 * n),
        "optimizer moments": (sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                                  if torch.is_tensor(t) and t.dim() > 0), 8 * n),
        "mask buffers (bool)": (sum(layer.mask.numel() * layer.mask.element_size()
                                    for layer in sparse_layers(net).values()), s),
    }
    print(f"\nstatic terms, measured on the shipped SmolLM2-135M (one process, one step; N = {n:,}, S = {s:,}):")
    print("| term | measured bytes | formula | ratio |")
    print("|---|---|---|---|")
    for name, (got, want) in measured.items():
        print(f"| {name} | {got:,} | {want:,} | {got / want:.4f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--skip-check", action="store_true", help="only the formula (no model is loaded)")
    args = p.parse_args()
    from transformers import LlamaConfig

    print(f"machine: {machine.line()}")
    c = counts(LlamaConfig(**LLAMA2_7B))
    print(f"LLaMA-2-7B: N = {c['N']:,} parameters, S = {c['S']:,} in {c['layers']} sparse layers; "
          f"{args.world} processes, micro-batch {args.batch} x {args.seq_len}")
    for checkpointing in (False, True):
        rows = budget(c, args.world, args.seq_len, args.batch, checkpointing, shard_teacher=False)
        print(f"\nper GPU, activation checkpointing {'on' if checkpointing else 'off'}:")
        print("| term | GB |\n|---|---|")
        for name, value in rows:
            print(f"| {name} | {value / GB:.1f} |")
        print(f"| **total** | **{sum(v for _, v in rows) / GB:.1f}** |")
    if not args.skip_check:
        check_static_terms()


if __name__ == "__main__":
    main()
