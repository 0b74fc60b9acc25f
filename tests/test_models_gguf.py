"""MODEL may be a local .gguf file: converted once (transformers + gguf) into the cache, as the default model is."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from semisparse.errors import UserError
from semisparse.models import default_gguf_path, default_model_dir, resolve_model


def test_a_corrupt_gguf_is_one_clear_error_and_caches_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMISPARSE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 60)
    with pytest.raises(UserError, match=r"cannot read GGUF model .*broken\.gguf"):
        resolve_model(str(bad))
    models = tmp_path / "cache" / "models"
    assert not models.exists() or not any(models.iterdir())


@pytest.mark.realmodel
def test_a_local_gguf_file_is_converted_once_and_equals_the_shipped_conversion(tmp_path, monkeypatch):
    reference = default_model_dir()  # the shipped GGUF converted by the default path (the user's cache)
    copy = tmp_path / "my-model.gguf"
    shutil.copyfile(default_gguf_path(), copy)
    monkeypatch.setenv("SEMISPARSE_CACHE", str(tmp_path / "cache"))
    first = resolve_model(str(copy))
    assert first.startswith(str(tmp_path / "cache" / "models" / "my-model-"))
    stamp = (tmp_path / "cache" / "models").stat().st_mtime_ns, sorted(p.name for p in (tmp_path / "cache" / "models").iterdir())
    assert resolve_model(str(copy)) == first  # cached: not converted again
    assert ((tmp_path / "cache" / "models").stat().st_mtime_ns, sorted(p.name for p in (tmp_path / "cache" / "models").iterdir())) == stamp
    ours, ref = load_file(f"{first}/model.safetensors"), load_file(str(reference / "model.safetensors"))
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
