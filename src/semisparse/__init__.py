"""semisparse: prune causal LMs to N:M (2:4) sparsity, retrain them with AST, evaluate and report.

The public API is ``semisparse.api``: one function per CLI verb, with the same arguments as the flags::

    from semisparse import api
    api.prune(...); api.train(...); api.evaluate(...); api.report(...); api.run(...)
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("semisparse")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
