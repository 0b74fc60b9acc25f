"""eval.json files never mix models: where `evaluate` writes by default, what may be merged, and what is refused
(before the model is loaded, leaving the file as it was)."""

from __future__ import annotations

import json

import pytest

from semisparse import api
from semisparse.errors import UserError
from semisparse.models import LoadedModel
from tiny import _SAMPLE, make_llama, make_tokenizer


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(_SAMPLE)
    return path


@pytest.fixture
def fake_hub(monkeypatch):
    """``load_model`` answers any spec with a tiny model (a hub id or ``default`` without the network); records the
    specs it was asked for."""
    asked = []

    def load_model(spec, *args, **kwargs):
        asked.append(spec)
        return LoadedModel(model=make_llama(), tokenizer=make_tokenizer(), source=spec, path=spec, run_meta=None)

    monkeypatch.setattr(api, "load_model", load_model)
    return asked


@pytest.fixture
def no_model_load(monkeypatch):
    def load_model(spec, *args, **kwargs):
        raise AssertionError(f"the model {spec} was loaded although its results cannot be written")

    monkeypatch.setattr(api, "load_model", load_model)


# ------------------------------------------------------------------ where results go by default


def test_hub_ids_and_default_get_one_file_each_in_the_working_directory(tmp_path, monkeypatch, text, fake_hub):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    first = api.evaluate("default", ppl=[str(text)], progress=False)
    second = api.evaluate("HuggingFaceTB/SmolLM2-135M", ppl=[str(text)], progress=False)
    assert fake_hub == ["default", "HuggingFaceTB/SmolLM2-135M"]
    assert first["json"] == "eval-default.json" and second["json"] == "eval-HuggingFaceTB--SmolLM2-135M.json"
    assert sorted(p.name for p in work.iterdir()) == ["eval-HuggingFaceTB--SmolLM2-135M.json", "eval-default.json"]
    assert json.loads((work / "eval-default.json").read_text())["model"] == "default"
    assert json.loads((work / "eval-HuggingFaceTB--SmolLM2-135M.json").read_text())["model"] == "HuggingFaceTB/SmolLM2-135M"


def test_local_model_results_stay_beside_it_and_merge(llama_dir, text, tmp_path, monkeypatch):
    other = tmp_path / "other.txt"
    other.write_text(_SAMPLE[::-1])
    monkeypatch.chdir(tmp_path)
    api.evaluate(str(llama_dir), ppl=[str(text)], progress=False)
    # the same model named by a relative path is the same model: merged, the first result kept
    api.evaluate(llama_dir.name, ppl=[str(other)], progress=False)
    ev = json.loads((llama_dir / "eval.json").read_text())
    assert ev["model"] == str(llama_dir) and set(ev["perplexity"]) == {str(text), str(other)}
    assert not list(tmp_path.glob("eval*.json"))


# ------------------------------------------------------------------ what is refused


def test_another_models_results_are_refused_before_loading(tmp_path, text, no_model_load):
    target = tmp_path / "results.json"
    target.write_text(json.dumps({"model": "org/model-a", "perplexity": {"x": {"ppl": 3.0}}}))
    before = target.read_bytes()
    with pytest.raises(UserError) as err:
        api.evaluate("org/model-b", ppl=[str(text)], out=target, progress=False)
    message = str(err.value)
    assert "\n" not in message and "org/model-a" in message and "org/model-b" in message and "--out FILE" in message
    assert target.read_bytes() == before


def test_a_model_directorys_eval_json_belongs_to_that_directory(llama_dir, tmp_path, text, fake_hub):
    # `prune` records the dense source as "model" in the run dir's eval.json: the folder still owns the file.
    (llama_dir / "eval.json").write_text(json.dumps({"model": "the-dense-source", "perplexity": {"dense:x": {}}}))
    api.write_eval_json(llama_dir / "eval.json", str(llama_dir), {"perplexity": {"y": {"ppl": 2.0}}})
    assert set(json.loads((llama_dir / "eval.json").read_text())["perplexity"]) == {"dense:x", "y"}
    before = (llama_dir / "eval.json").read_bytes()
    with pytest.raises(UserError, match=rf"holds the results of {llama_dir}, not of org/other-model"):
        api.evaluate("org/other-model", ppl=[str(text)], out=llama_dir / "eval.json", progress=False)
    assert fake_hub == [] and (llama_dir / "eval.json").read_bytes() == before


@pytest.mark.parametrize("content, detail", [("{not json", "Expecting property name"),
                                             ("[1, 2]", "expected an object, found list"),
                                             ('"just a string"', "expected an object, found str")])
def test_a_corrupt_or_non_object_file_is_refused_not_dropped(tmp_path, text, no_model_load, content, detail):
    target = tmp_path / "eval-default.json"
    target.write_text(content)
    with pytest.raises(UserError) as err:
        api.evaluate("default", ppl=[str(text)], out=target, progress=False)
    message = str(err.value)
    assert message.startswith(f"{target} is not valid JSON (") and detail in message
    assert message.endswith(": move it away or give --out FILE") and "\n" not in message
    assert target.read_text() == content
    with pytest.raises(UserError, match="is not valid JSON"):  # the writer itself refuses too
        api.write_eval_json(target, "default", {"perplexity": {}})
    assert target.read_text() == content


def test_write_eval_json_merges_one_models_results(tmp_path):
    target = tmp_path / "r.json"
    api.write_eval_json(target, "org/m", {"perplexity": {"a": {"ppl": 1.0}}})
    api.write_eval_json(target, "org/m", {"perplexity": {"b": {"ppl": 2.0}}, "zeroshot": {"tasks": {}}})
    ev = json.loads(target.read_text())
    assert ev["model"] == "org/m" and ev["perplexity"] == {"a": {"ppl": 1.0}, "b": {"ppl": 2.0}}
    assert ev["zeroshot"] == {"tasks": {}} and "updated" in ev
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temp file left
