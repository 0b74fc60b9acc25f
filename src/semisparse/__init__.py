"""semisparse: prune causal LMs to N:M (2:4) sparsity, retrain them with AST, evaluate and report.

The public API is ``semisparse.api``: one function per CLI verb, with the same arguments as the flags::

    from semisparse import api
    api.prune(...); api.train(...); api.evaluate(...); api.export(...); api.report(...); api.run(...)

``semisparse.load(FOLDER)`` rebuilds the transformers model of an exported folder (``semisparse export``).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("semisparse")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__", "load"]


def load(path, device="cpu", dtype=None, backend=None, lm_head="float"):
    """The transformers model of an exported folder (``semisparse export``), every file's sha256 checked first.

    Packed weights are unpacked (and de-quantized) into the stock layers, a SLoRB branch re-attached; ``generate``
    and lm-eval's HFLM work on the result. ``device``: cpu, cuda, cuda:1, auto; ``dtype``: a torch dtype, default
    the export dtype. The tokenizer: ``AutoTokenizer.from_pretrained(path)``. torch is imported on the first call.
    ``backend="cpu"`` (an int8/int4 packed export, on the CPU) runs the sparse layers through torch's weight-only
    CPU kernels where a short measurement finds them faster (docs/export.md); ``backend="semi-structured"`` (CUDA,
    2:4) runs them as ``torch.sparse.to_sparse_semi_structured`` weights where they measure faster than dense, and
    says so and runs dense where it cannot. With the cpu backend, ``lm_head="int8"`` also quantizes the LM head at
    load (one scale per row) and runs it through the int8 kernel where that measures not slower. The choice is
    printed and kept as ``model.semisparse_backend``.
    """
    from semisparse.devices import resolve_device
    from semisparse.export.load import load_export

    return load_export(path, resolve_device(device), dtype, backend=backend, lm_head=lm_head)[0]
