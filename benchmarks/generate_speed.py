"""`semisparse generate` tokens/s on this machine, against transformers' own `generate` at the same settings.

SmolLM2-135M (shipped), prompts of 16 tokens from the shipped text, 128 new tokens, temperature 1, top-p 1, at each
--batch-sizes. `semisparse` = api.generate into a temporary shard folder (its own tokens/s, from the index: tokens
written / seconds, prompts included since they are part of the documents); `transformers` = the same model, weight
dtype (bf16 where the CPU has native bf16) and prompts through `model.generate` in a loop, timed here (new tokens + prompt tokens / seconds), the baseline the
ratio is against. Time it alone on the machine.

    .venv/bin/python benchmarks/generate_speed.py [--batch-sizes 8,32] [--tokens 8192] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NEW, PROMPT = 128, 16


def plain_generate(batch_size: int, tokens: int) -> dict:
    import torch

    from semisparse import data as data_mod
    from semisparse.devices import resolve_precision
    from semisparse.models import load_model

    precision = resolve_precision("auto", torch.device("cpu"))[0]
    loaded = load_model("default", dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    model, tok = loaded.model.eval(), loaded.tokenizer
    docs = [d for d in data_mod.load_text("default", "train").docs[:2000]]
    prompts = [ids[:PROMPT] for ids in (tok(d, add_special_tokens=False)["input_ids"] for d in docs)
               if len(ids) >= PROMPT]
    done, seconds, batch = 0, 0.0, 0
    while done < tokens:
        rows = [prompts[(batch * batch_size + i) % len(prompts)] for i in range(batch_size)]
        ids = torch.tensor(rows)
        torch.manual_seed(batch)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                 top_p=1.0, top_k=0, max_new_tokens=NEW, pad_token_id=tok.eos_token_id)
        seconds += time.perf_counter() - start
        # counted as semisparse counts a document: the prompt, then the new tokens up to and including the first EOS
        new = out[:, PROMPT:]
        is_eos = new == tok.eos_token_id
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full((new.shape[0],), new.shape[1]))
        done += int(PROMPT * new.shape[0] + first.sum())
        batch += 1
    return {"tokens": done, "seconds": seconds, "tokens_per_s": done / seconds, "precision": precision}


def ours(batch_size: int, tokens: int, folder: Path) -> dict:
    from semisparse import api

    index = api.generate("default", folder / f"gen-{batch_size}", tokens=tokens, prompts="default",
                         prompt_tokens=PROMPT, max_new_tokens=NEW, batch_size=batch_size, progress=False,
                         say=lambda *_: None)
    return {"tokens": index["tokens"], "seconds": index["run"]["seconds"],
            "tokens_per_s": index["run"]["tokens_per_s"], "precision": index["source"]["precision"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="8,32")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per measurement")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "generate_speed.json")
    args = p.parse_args()
    info = machine.describe()
    print(f"machine: {machine.line(info)}")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="generate_speed_") as tmp:
        for b in (int(x) for x in args.batch_sizes.split(",")):
            rows[b] = {"transformers": plain_generate(b, args.tokens), "semisparse": ours(b, args.tokens, Path(tmp))}
    print(f"\nSmolLM2-135M, {PROMPT}-token prompts, {NEW} new tokens, temperature 1\n")
    print("| batch | precision | transformers generate tok/s | semisparse generate tok/s | ratio |")
    print("|---|---|---|---|---|")
    for b, r in rows.items():
        t, s = r["transformers"], r["semisparse"]
        print(f"| {b} | {s['precision']} | {t['tokens_per_s']:.0f} | {s['tokens_per_s']:.0f} | "
              f"{s['tokens_per_s'] / t['tokens_per_s']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from semisparse.rundir import atomic_write_json

    atomic_write_json(args.out, {"machine": info, "settings": {"prompt_tokens": PROMPT, "new_tokens": NEW,
                                                               "tokens": args.tokens}, "rows": rows}, indent=1)
    print(f"\nresults: {args.out}")


if __name__ == "__main__":
    main()
