"""What a sparse forward keeps for backward: SparseLinear's fused linear vs autograd on F.linear(x, W̃).

SparseLinear keeps x, W (and CAST's weight scale A) and M for backward and rebuilds the weight it multiplied by,
W̃ = (W·A) ⊙ M, there (train/sparse_linear.py); the baseline, the layer as it was before, keeps W̃ (or autocast's
cast of it) as autograd on ``F.linear(x, W̃)`` does. ``--layer ast``: the masked forward without a scale (AST,
fixed mask); ``--layer cast``: CAST's layer, the dense forward through a 2-block weight scale. Both variants run in
this process on the shipped SmolLM2-135M, 2:4 by magnitude on the 210 decoder linear layers, one micro-batch of
C4 text, at the precision ``train.precision: auto`` picks here. Reported per variant: the bytes of every tensor
autograd saves in the forward (counted once per storage, parameters and buffers excluded: they exist anyway), the
median forward+backward time over alternating rounds, and the largest gradient difference between the two.

    .venv/bin/python benchmarks/masked_linear_memory.py [--layer ast|cast] [--batch-size 4] [--seq-len 256]
        [--rounds 3] [--steps 3]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import machine

ROOT = Path(__file__).resolve().parents[1]
C4 = ROOT.parent / "shared" / "data" / "c4" / "c4_train_shard0_first1000.jsonl"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layer", choices=["ast", "cast"], default="ast",
                   help="ast: masked forward, no scale; cast: dense forward through a 2-block weight scale")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (A B, B A, ...) to cancel drift")
    p.add_argument("--steps", type=int, default=3, help="timed forward+backward passes per variant and round")
    p.add_argument("--out", type=Path, default=None,
                   help="default benchmarks/results/masked_linear_memory[_cast].json")
    args = p.parse_args()

    import torch
    import torch.nn.functional as F

    from semisparse.data import read_file, tokenize_joined
    from semisparse.devices import resolve_precision
    from semisparse.models import load_model
    from semisparse.rundir import atomic_write_json
    from semisparse.train.sparse_linear import SparseLinear, sparsify

    info = machine.describe()
    print(f"machine: {machine.line(info)}")
    loaded = load_model("default")
    model, tokenizer = loaded.model, loaded.tokenizer
    cast = args.layer == "cast"
    layers = sparsify(model, None, "2:4", weight_scale_n=2 if cast else None, dense_forward=cast)
    if cast:  # a trained scale is not all ones: keep the product from being W itself
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for layer in layers.values():
                layer.weight_scale.copy_(torch.rand(layer.weight_scale.shape, generator=gen) * 0.2 + 0.9)
    out = args.out or ROOT / "benchmarks" / "results" / f"masked_linear_memory{'_cast' if cast else ''}.json"
    precision, reason = resolve_precision("auto", torch.device("cpu"))
    print(f"{len(layers)} sparse layers ({args.layer}); precision {precision} ({reason}); "
          f"batch {args.batch_size} x {args.seq_len}")
    stream = tokenize_joined(tokenizer, read_file(C4)[:200])
    ids = stream[: args.batch_size * args.seq_len].view(args.batch_size, args.seq_len)
    kept = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    fused_forward = SparseLinear.forward

    def product_kept_forward(self, x):  # the layer before: autograd on F.linear keeps W̃
        return F.linear(x, self.scaled_weight() if self.dense_forward else self.masked_weight(), self.bias)

    fused, baseline = "fused (W, A, M kept)", "baseline (W̃ kept)"
    variants = {fused: fused_forward, baseline: product_kept_forward}

    def step(count_saved: bool = False) -> tuple[float, int]:
        saved: dict[int, int] = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in kept:
                saved[ptr] = t.untyped_storage().nbytes()
            return t

        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if count_saved else contextlib.nullcontext():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return time.perf_counter() - start, sum(saved.values())

    results = {}
    grads = {}
    for name, forward in variants.items():
        SparseLinear.forward = forward
        _, nbytes = step(count_saved=True)
        grads[name] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        results[name] = {"saved_bytes": nbytes, "step_s": []}
    for rnd in range(args.rounds):
        order = list(variants) if rnd % 2 == 0 else list(variants)[::-1]
        for name in order:
            SparseLinear.forward = variants[name]
            step()  # warm-up after the switch
            results[name]["step_s"] += [step()[0] for _ in range(args.steps)]
    SparseLinear.forward = fused_forward

    a, b = grads.values()
    max_diff = max((a[n] - b[n]).abs().max().item() for n in a)
    max_grad = max(g.abs().max().item() for g in a.values())
    base = results[baseline]
    print("| variant | saved for backward | ratio | median fwd+bwd | ratio |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        r["median_step_s"] = statistics.median(r["step_s"])
        print(f"| {name} | {r['saved_bytes'] / 2**20:.0f} MiB | {r['saved_bytes'] / base['saved_bytes']:.2f} | "
              f"{r['median_step_s']:.2f} s | {r['median_step_s'] / statistics.median(base['step_s']):.2f} |")
    sparse_bytes = sum(layer.weight.numel() for layer in layers.values()) * (2 if precision == "bf16" else 4)
    print(f"difference {(base['saved_bytes'] - results[fused]['saved_bytes']) / 2**20:.0f} MiB; "
          f"the sparse weights in the compute dtype: {sparse_bytes / 2**20:.0f} MiB")
    print(f"largest gradient difference between the variants: {max_diff:.3g} (largest gradient {max_grad:.3g})")
    atomic_write_json(out, indent=1, data={
        "machine": info, "layer": args.layer, "precision": precision, "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "rounds": args.rounds, "steps": args.steps, "variants": results, "sparse_weight_bytes": sparse_bytes,
        "max_grad_diff": max_diff, "max_grad": max_grad})
    print(f"results: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
