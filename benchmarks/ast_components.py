"""AST's extra work per step, timed alone: the mask recompute (every Δt steps) and the masked-decay optimizer step,
against a frozen-mask step's optimizer (torch AdamW) and the student's forward+backward, all in one process.

Complements ``ast_overhead.py``, whose whole-step timings on a shared CPU are noisier than the overhead itself.

    .venv/bin/python benchmarks/ast_components.py [--model default] [--seq-len 256] [--batch-size 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return statistics.median(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--every", type=int, default=10, help="Δt: recompute cost is divided by it per step")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ast_components.json")
    args = p.parse_args()

    import torch

    from semisparse.models import load_model, package_versions
    from semisparse.train.optim import (
        MaskedAdamW,
        add_masked_decay_to_grad,
        set_srste_lambda,
    )
    from semisparse.train.sparse_linear import param_masks, sparsify
    from semisparse.train.trainer import recompute_masks

    torch.manual_seed(0)
    net = load_model(args.model).model
    layers = sparsify(net, None, "2:4")
    net.train()
    net.config.use_cache = False
    masks0 = {name: layer.mask.clone() for name, layer in layers.items()}
    masked = param_masks(net)
    params = [q for q in net.parameters() if q.requires_grad]
    ids = torch.randint(0, net.config.vocab_size, (args.batch_size, args.seq_len))

    def fwd_bwd():
        net.zero_grad(set_to_none=False)
        net(input_ids=ids, labels=ids).loss.backward()

    fwd_bwd()  # grads exist from here on
    adamw = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.1)
    masked_adamw = MaskedAdamW(params, lr=1e-6, weight_decay=0.1, masks=masked)
    set_srste_lambda(masked_adamw, 1e-4)
    adamw.step()
    masked_adamw.step()  # allocate optimizer state before timing

    t_fwd_bwd = timed(fwd_bwd, args.repeats)
    t_adamw = timed(adamw.step, args.repeats)
    t_masked = timed(masked_adamw.step, args.repeats)
    t_grad_decay = timed(lambda: add_masked_decay_to_grad(masked, 1e-4), args.repeats)
    t_recompute = timed(lambda: recompute_masks(layers, masks0), args.repeats)

    frozen = t_fwd_bwd + t_adamw  # a frozen-mask, no-decay step without teacher
    extra_paper = t_masked - t_adamw + t_recompute / args.every
    extra_grad = t_grad_decay + t_recompute / args.every
    rows = [
        ("student forward+backward (no teacher)", t_fwd_bwd),
        ("torch AdamW step (frozen-mask baseline)", t_adamw),
        ("MaskedAdamW step (paper variant, λ > 0)", t_masked),
        ("λ·(¬M⊙W) added to the gradients (grad variant)", t_grad_decay),
        (f"mask recompute + flip counts, all layers (every {args.every} steps)", t_recompute),
    ]
    header = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
        "python": platform.python_version(), "versions": package_versions(),
        "settings": {"model": args.model, "layers": len(layers), "batch": f"{args.batch_size} x {args.seq_len}",
                     "repeats (median)": args.repeats},
    }
    print(json.dumps(header, indent=1))
    print("\n| component | median (s) |\n|---|---|")
    for name, sec in rows:
        print(f"| {name} | {sec:.4f} |")
    print(f"\nextra per step, paper variant: {extra_paper:.4f} s = {100 * extra_paper / frozen:.2f}% of a frozen "
          f"step without teacher ({frozen:.3f} s); grad variant: {extra_grad:.4f} s = {100 * extra_grad / frozen:.2f}%")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"header": header, "components_s": dict(rows), "frozen_step_s": frozen,
                                    "extra_paper_s": extra_paper, "extra_grad_s": extra_grad,
                                    "ratio_paper": (frozen + extra_paper) / frozen,
                                    "ratio_grad": (frozen + extra_grad) / frozen}, indent=1) + "\n")


if __name__ == "__main__":
    main()
