"""Shared pieces of ``benchmarks/gpu_suite.py``: the clock and budget, the results file, the log, timing, the tiny
smoke model, the trainer deadline guard, the FLOP formula and the environment record.

Nothing here imports matplotlib or lm-eval (neither is on the GPU machine), and nothing imports the tests.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KIT_DATA = Path("/root/kit/data")  # the device kit's data folder (shared/tools/device-kit)
C4_TRAIN = "c4/c4_train_shard0_first1000.jsonl"
WIKI_VALID = "wikitext2/wiki.valid.raw"
SKIP_CUDA = "skipped: needs CUDA"


def data_roots() -> list[Path]:
    """Where the standard data may be: $SEMISPARSE_DATA, the device kit's /root/kit/data, ../shared/data."""
    roots = [Path(os.environ["SEMISPARSE_DATA"]).expanduser()] if os.environ.get("SEMISPARSE_DATA") else []
    return roots + [KIT_DATA, ROOT.parent / "shared" / "data"]


def find_data(rel: str) -> Path | None:
    for base in data_roots():
        if (base / rel).is_file():
            return base / rel
    return None


# ------------------------------------------------------------------------------------------------ clock, budget


class Clock:
    """Seconds since the script started (``t0``, taken before the heavy imports) against the budget.

    ``left()`` is what the parts may still use: the budget minus the elapsed time minus ``reserve_s`` kept for the
    final JSON, the table and the clean-up."""

    def __init__(self, budget_s: float, t0: float, reserve_s: float) -> None:
        self.budget_s, self.t0, self.reserve_s = float(budget_s), t0, float(reserve_s)
        self.end = t0 + self.budget_s - self.reserve_s

    @staticmethod
    def now() -> float:
        return time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.end - time.monotonic()


@dataclass
class Suite:
    """What every part needs: settings, where to write, the clock, and the one results record (saved often)."""

    args: object
    out: Path
    work: Path
    clock: Clock
    device: str  # "cpu" | "cuda" (resolved)
    smoke: bool
    model: str  # a model directory from_pretrained loads (resolved once)
    model_label: str
    data: str  # training / calibration text
    eval_data: str  # perplexity text
    results: dict
    shared: dict = field(default_factory=dict)  # figures one part hands to a later one

    @property
    def json_path(self) -> Path:
        return self.out / "gpu_suite.json"

    def log(self, msg: str) -> None:
        print(f"[gpu_suite {self.clock.elapsed():7.1f}s] {msg}", flush=True)

    def save(self) -> None:
        from semisparse.rundir import atomic_write_json

        self.results["budget"]["elapsed_s"] = round(self.clock.elapsed(), 2)
        atomic_write_json(self.json_path, self.results, indent=1)

    def note_cut(self, where: str, why: str) -> None:
        """Record that ``where`` was cut short or skipped because of the clock (budget.cut in the JSON)."""
        self.results["budget"]["cut"].append({"where": where, "why": why})

    def keep_metrics(self, run_dir: Path, name: str) -> str | None:
        """Copy a run's metrics.jsonl into OUT/metrics/ (model files stay in the work folder); the relative path."""
        src = Path(run_dir) / "metrics.jsonl"
        if not src.is_file():
            return None
        dst = self.out / "metrics" / f"{name}.jsonl"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        return str(dst.relative_to(self.out))


def error_record(exc: BaseException) -> dict:
    return {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000],
            "traceback": traceback.format_exc()[-4000:]}


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Tee:
    """Writes to the terminal and to the log file (stdout and stderr both go through one)."""

    def __init__(self, stream, fh) -> None:
        self.stream, self.fh = stream, fh

    def write(self, text: str) -> int:
        self.stream.write(text)
        try:
            self.fh.write(text)
            self.fh.flush()
        except ValueError:  # the log was closed at exit
            pass
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self.stream, name)


# ------------------------------------------------------------------------------------------------ timing


def time_calls(fn, device: str, warmup: int, reps: int) -> list[float]:
    """Seconds per call of ``fn``: CUDA events on a GPU (one pair per call), perf_counter on the CPU."""
    import torch

    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in pairs:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) / 1e3 for start, end in pairs]
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def median(values) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


# ------------------------------------------------------------------------------------------------ FLOPs, MFU

FLOPS_FORMULA = (
    "flops_per_token = 6*N_student + 2*N_teacher + 6*L_student*s*d_attn_student + 2*L_teacher*s*d_attn_teacher "
    "(no teacher: its terms are 0). N = weights of every matmul (all nn.Linear including the LM head; a tied "
    "embedding counted once, as the head; the embedding lookup is not a matmul); the 2:4 student is counted dense "
    "because training runs dense GEMMs on W*M. Attention: QK^T and PV at the causal average context s/2 give "
    "2*s*d_attn FLOPs per token per layer forward (d_attn = heads*head_dim), backward twice that. Recomputation "
    "(the chunked loss's LM head in backward) is not counted. "
    "mfu = flops_per_token * tokens_per_s / peak_flops_per_s, the peak MEASURED in this run by a large matmul "
    "in the training compute dtype (bf16 on CUDA)."
)


def matmul_params(model) -> int:
    """Entries of every nn.Linear weight (tied weights once)."""
    from torch import nn

    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.weight.numel()
    return total


def attention_dims(config) -> tuple[int, int]:
    """(layers, d_attn = heads * head_dim) of a transformers config."""
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, heads * int(head_dim)


def flops_per_token(n_student: int, n_teacher: int, layers: int, d_attn: int, seq_len: int,
                    with_teacher: bool = True) -> float:
    """The formula of FLOPS_FORMULA, student and teacher being the same architecture."""
    teacher = (2 * n_teacher + 2 * layers * seq_len * d_attn) if with_teacher else 0
    return 6 * n_student + 6 * layers * seq_len * d_attn + teacher


# ------------------------------------------------------------------------------------------------ trainer guard


class DeadlineReached(Exception):
    """Raised inside trainer.train (from its metrics writer) when a run passes its deadline."""


@contextlib.contextmanager
def trainer_deadline(deadline: float):
    """Stop ``semisparse.train.trainer.train`` after the first step that ends past ``deadline`` (monotonic).

    The trainer has no stop hook, so its metrics writer is wrapped for the duration: the step record is written
    first (the measurement is kept), then DeadlineReached leaves the loop. This is a safety net only: runs are
    sized from measured step times to finish before it."""
    from semisparse.train import trainer as tr

    base = tr.MetricsLog

    class GuardedLog(base):  # type: ignore[misc, valid-type]
        def write(self, record: dict) -> None:
            super().write(record)
            if "step_s" in record and time.monotonic() > deadline:
                raise DeadlineReached(f"deadline reached after step {record.get('step')}")

    tr.MetricsLog = GuardedLog
    try:
        yield
    finally:
        tr.MetricsLog = base


def step_stats(records: list[dict], tokens_per_step: int) -> dict:
    """Throughput figures from trainer step records (each has step_s and tokens_per_s)."""
    step_s = [r["step_s"] for r in records]
    tps = [r["tokens_per_s"] for r in records]
    teacher = [r["teacher_s"] / r["step_s"] for r in records if r.get("teacher_s") is not None and r["step_s"] > 0]
    out = {
        "timed_steps": [r["step"] for r in records],
        "step_s": step_s,
        "step_tokens_per_s": tps,
        "tokens_per_s": median(tps),  # THE figure: median of the recorded steps' tokens_per_s
        "median_step_s": median(step_s),
        "mean_step_s": statistics.fmean(step_s) if step_s else None,
        "tokens_per_s_amortized": tokens_per_step * len(step_s) / sum(step_s) if step_s else None,
        "teacher_share": median(teacher),
    }
    return out


# ------------------------------------------------------------------------------------------------ smoke model

_WORDS = ("the quick brown fox jumps over lazy dog semi structured sparsity keeps two of every four weights "
          "language models predict next token from previous ones training adaptive masks decay teacher student "
          "kernel matrix tensor core prune retrain distill measure").split()
SMOKE_VOCAB = 384


def smoke_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(30, 80))) + "." for _ in range(n)]


def build_smoke_model(folder: Path) -> Path:
    """A tiny random Llama with a tiny byte-level BPE tokenizer (no hub), saved as a model folder (as tests/tiny.py
    builds them; written here because the suite must not import the tests)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=SMOKE_VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(smoke_docs(40, 0), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=SMOKE_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_smoke_texts(folder: Path) -> tuple[Path, Path]:
    """(training text .jsonl, evaluation text .txt), different documents."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    train = folder / "smoke_train.jsonl"
    train.write_text("".join(json.dumps({"text": d}) + "\n" for d in smoke_docs(60, 1)))
    evaluation = folder / "smoke_eval.txt"
    evaluation.write_text("\n".join(smoke_docs(20, 2)) + "\n")
    return train, evaluation


# ------------------------------------------------------------------------------------------------ environment


def _nvidia_smi() -> dict:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"nvidia_smi": "not found"}
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"nvidia_smi": f"failed: {exc}"}
    line = out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""
    parts = [p.strip() for p in line.split(",")]
    keys = ("name", "driver", "memory_total", "sm_clock_max", "power_limit")
    return dict(zip(keys, parts)) if len(parts) == len(keys) else {"nvidia_smi": (out.stdout + out.stderr)[:500]}


def environment(device: str) -> dict:
    import torch

    from semisparse.models import package_versions

    env = {
        "python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device,
        "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "packages": package_versions(),
    }
    cusparselt = getattr(torch.backends, "cusparselt", None)
    try:
        env["cusparselt_version"] = cusparselt.version() if cusparselt is not None else None
        env["cusparselt_available"] = bool(cusparselt.is_available()) if cusparselt is not None else False
    except Exception as exc:  # noqa: BLE001 - a broken backend is a finding, not a crash
        env["cusparselt_version"] = f"error: {exc}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update({
            "gpu_name": torch.cuda.get_device_name(0), "gpu_capability": list(torch.cuda.get_device_capability(0)),
            "gpu_memory_gib": round(props.total_memory / 2**30, 2), "gpu_count": torch.cuda.device_count(),
            "cudnn": torch.backends.cudnn.version(),
        })
        env["driver"] = _nvidia_smi()
    return env


def fmt(value, spec: str = ",.0f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def restore_stdio(saved) -> None:
    sys.stdout, sys.stderr = saved
