import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from semisparse import data
from semisparse.errors import UserError


def test_txt_rows_follow_hf_text_loader(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text(" = Title = \n\n Body line .\n", encoding="utf-8")
    src = data.load_text(str(p))
    assert src.docs == [" = Title = \n", "", " Body line .\n"]


def test_wikitext_valid_rows_match_recipe(shared_data):
    p = shared_data / "wikitext2" / "wiki.valid.raw"
    rows = [line if line.strip() else "" for line in open(p, encoding="utf-8").read().splitlines(keepends=True)]
    assert data.load_text(str(p), split="eval").docs == rows
    assert len(rows) == 3760


def test_jsonl_parquet_folder(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    pq.write_table(pa.table({"body": ["three"]}), tmp_path / "b.parquet")
    assert data.load_text(str(tmp_path / "d" / "a.jsonl")).docs == ["one", "two"]
    assert data.load_text(str(tmp_path / "b.parquet"), field="body").docs == ["three"]
    with pytest.raises(UserError, match="no column 'text'"):
        data.load_text(str(tmp_path / "b.parquet"))
    assert data.load_text(str(tmp_path / "d")).docs == ["one", "two"]


def test_c4_jsonl(shared_data):
    src = data.load_text(str(shared_data / "c4" / "c4_train_shard0_first1000.jsonl"))
    assert len(src.docs) == 1000


@pytest.mark.parametrize("content,match", [("", "empty"), ("{not json\n", "not valid JSON"), ('{"x": 1}\n', "no field 'text'")])
def test_bad_files(tmp_path, content, match):
    p = tmp_path / ("f.txt" if content == "" else "f.jsonl")
    p.write_text(content)
    with pytest.raises(UserError, match=match):
        data.load_text(str(p))


def test_missing_and_unsupported(tmp_path):
    with pytest.raises(UserError, match="not found"):
        data.load_text(str(tmp_path / "nope.txt"))
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(UserError, match="unsupported"):
        data.load_text(str(tmp_path / "x.csv"))


def test_default_split_is_disjoint_and_stable():
    train = data.load_text("default", split="train")
    held = data.load_text("default", split="eval")
    assert len(held.docs) > 500 and len(train.docs) > 8 * len(held.docs)
    assert not set(train.docs) & set(held.docs)
    titles = [t for t, _ in data._default_articles()]
    assert sum(data.is_heldout(t) for t in titles) == len(held.docs)
    assert data.load_text("default", split="eval").docs == held.docs


def test_calibration_windows_are_seeded(tokenizer):
    stream = data.token_stream(tokenizer, ["the quick brown fox"] * 50)
    assert int((stream == tokenizer.eos_token_id).sum()) == 50
    a = data.calibration_windows(stream, 8, 16, seed=3)
    b = data.calibration_windows(stream, 8, 16, seed=3)
    c = data.calibration_windows(stream, 8, 16, seed=4)
    assert a.shape == (8, 16) and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(UserError, match="fewer than one window"):
        data.calibration_windows(stream[:10], 1, 16, seed=0)


def test_tokenize_joined(tokenizer):
    ids = data.tokenize_joined(tokenizer, ["a b", "c"])
    assert tokenizer.decode(ids) == "a b\n\nc"
