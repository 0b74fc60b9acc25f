"""The export choices and their checks, one place for the CLI, the API and the pipeline config (no torch here)."""

from __future__ import annotations

from semisparse.errors import UserError

FORMATS = ("packed", "hf")  # folder formats: what the pipeline's export stage writes (OUT/export)
FILE_FORMATS = ("gguf",)  # one file, --out FILE.gguf (llama.cpp); not a pipeline stage
DTYPES = ("fp16", "bf16", "fp32")
QUANTS = ("none", "int8", "int4")
#: --format gguf: GGUF's own block formats (--quant none: floats in --dtype).
GGUF_QUANTS = ("q8_0", "q4_0")
#: --group-size default: the largest of these that divides a layer's compacted width (in * N / M).
GROUP_SIZES = (128, 64, 32)


def _choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"unknown {flag} {value!r} (choose from {', '.join(choices)})")


def check_options(format: str, dtype: str, quant: str, group_size: int | None, merge_slorb: bool) -> None:  # noqa: A002
    """One-line UserError for a choice that does not exist or a combination that means nothing."""
    _choice("--format", format, FORMATS + FILE_FORMATS)
    _choice("--dtype", dtype, DTYPES)
    _choice("--quant", quant, QUANTS + GGUF_QUANTS)
    if format == "gguf" and quant not in ("none", *GGUF_QUANTS):
        raise UserError(f"--format gguf takes --quant none, {', '.join(GGUF_QUANTS)} (GGUF's own block formats), "
                        f"not {quant}")
    if format != "gguf" and quant in GGUF_QUANTS:
        raise UserError(f"--quant {quant} is a GGUF block format: it needs --format gguf")
    if quant != "none" and format == "hf":
        raise UserError(f"--quant {quant} needs --format packed (the hf format stores dense weights)")
    if group_size is not None:
        if quant != "int4":
            raise UserError("--group-size applies to --quant int4 only (int8 uses one scale per output channel)")
        if group_size <= 0:
            raise UserError(f"--group-size must be positive (got {group_size})")
    if merge_slorb and format not in ("hf", "gguf"):
        raise UserError("--merge-slorb needs --format hf or gguf: the packed format keeps the SLoRB branch as its "
                        "own tensors (merging it would break N:M)")


#: --quant-method: round to nearest, or GPTQ (calibrated error compensation, export/gptq.py).
QUANT_METHODS = ("rtn", "gptq")


def check_quant_method(method: str, format: str, quant: str, calib: str | None, nsamples: int | None,  # noqa: A002
                       seqlen: int | None) -> None:
    """One-line UserError for a --quant-method combination that means nothing (before any model loads)."""
    _choice("--quant-method", method, QUANT_METHODS)
    if method == "rtn":
        if calib is not None or nsamples is not None or seqlen is not None:
            raise UserError("--calib, --nsamples and --seqlen calibrate --quant-method gptq; rtn takes none")
        return
    if format != "packed":
        raise UserError(f"--quant-method gptq needs --format packed (got --format {format}): it quantizes the "
                        "kept values of the packed format")
    if quant not in ("int8", "int4"):
        raise UserError(f"--quant-method gptq needs --quant int8 or int4 (got --quant {quant})")
    if nsamples is not None and nsamples <= 0:
        raise UserError(f"--nsamples must be positive (got {nsamples})")
    if seqlen is not None and seqlen < 2:
        raise UserError(f"--seqlen must be at least 2 (got {seqlen})")


#: ``semisparse.load(backend=...)`` / ``--backend``: none = the de-quantized float path; cpu = torch's weight-only
#: int8/int4 CPU kernels (export/cpu_backend.py); semi-structured = torch's 2:4 sparse CUDA kernels
#: (export/cuda_backend.py; without CUDA, or for a pattern other than 2:4, it says so and runs the float path).
BACKENDS = ("none", "cpu", "semi-structured")


def check_backend(backend: str | None) -> str:
    """The backend's name (None -> "none"); a one-line UserError for one that does not exist."""
    backend = "none" if backend is None else backend
    _choice("--backend", backend, BACKENDS)
    return backend


#: ``lm_head=`` / ``--lm-head``: float = the LM head as exported (it is never pruned or quantized in the file);
#: int8 = the cpu backend quantizes it at load, round to nearest with one scale per output row (a vocabulary
#: entry), and runs it through the int8 weight-only kernel where that measures not slower. Decoding a small model
#: spends a large share of each token in the LM head (SmolLM2-135M: 28 M of its 135 M weights).
LM_HEADS = ("float", "int8")


def check_lm_head(lm_head: str, backend: str) -> str:
    """The LM head's choice; a one-line UserError for an unknown one or int8 without the cpu backend."""
    _choice("--lm-head", lm_head, LM_HEADS)
    if lm_head != "float" and backend != "cpu":
        raise UserError(f"--lm-head {lm_head} runs through the cpu backend's int8 kernel: add --backend cpu")
    return lm_head
