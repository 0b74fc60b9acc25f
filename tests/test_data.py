import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from semisparse import data
from semisparse.errors import UserError


def test_txt_rows_keep_line_endings_and_blank_lines_are_empty(tmp_path):
    # One row per line with its line ending ("\r\n" read as "\n"); a whitespace-only line is an empty row;
    # lines end where str.splitlines ends them (also at a form feed); the last line needs no newline.
    p = tmp_path / "a.txt"
    p.write_bytes(b" = Title = \n\n Body line .\r\n \t \nA\x0cB\nlast")
    assert data.load_text(str(p)).docs == [" = Title = \n", "", " Body line .\n", "", "A\x0c", "B\n", "last"]


def test_txt_rows_relation_to_hf_text_loader(tmp_path):
    """What ``datasets``' ``text`` loader makes of the same files (run offline on local files).

    Its default drops the line endings; with keep_linebreaks=True it has our rows except that whitespace-only
    lines stay as they are (ours: ""). It breaks lines only at "\n" (after reading "\r\n"/"\r" as "\n"),
    where str.splitlines, and so the SparseGPT/Wanda recipe and semisparse, also breaks at "\f" and others.
    """
    datasets = pytest.importorskip("datasets")

    def hf_rows(path, keep):
        ds = datasets.load_dataset("text", data_files=str(path), split="train", keep_linebreaks=keep,
                                   cache_dir=str(tmp_path / "hf-cache"))
        return list(ds["text"])

    plain = tmp_path / "plain.txt"
    plain.write_bytes(b" = T = \n \n Body .\n\nend")
    ours = data.load_text(str(plain)).docs
    assert ours == [" = T = \n", "", " Body .\n", "", "end"]
    assert hf_rows(plain, keep=False) == [" = T = ", " ", " Body .", "", "end"]
    keep = hf_rows(plain, keep=True)
    assert keep == [" = T = \n", " \n", " Body .\n", "\n", "end"]
    assert ours == [row if row.strip() else "" for row in keep]

    ff = tmp_path / "formfeed.txt"
    ff.write_bytes(b"A\x0cB\n")
    assert data.load_text(str(ff)).docs == ["A\x0c", "B\n"]
    assert hf_rows(ff, keep=True) == ["A\x0cB\n"]


@pytest.mark.standard_data("wikitext2/wiki.valid.raw")
def test_wikitext_valid_rows_match_recipe(shared_data):
    p = shared_data / "wikitext2" / "wiki.valid.raw"
    rows = [line if line.strip() else "" for line in open(p, encoding="utf-8").read().splitlines(keepends=True)]
    assert data.load_text(str(p), split="eval").docs == rows
    assert len(rows) == 3760


def test_wikitext_style_rows_on_fixture(fixture_data, tokenizer):
    src = data.load_text(str(fixture_data / "wikitext2" / "wiki.valid.raw"), split="eval")
    assert src.docs == [
        "",
        " = Fixture Island = \n",
        "",
        " Fixture Island is a small made @-@ up island with 3 @,@ 000 people . It has one harbour and no cars . \n",
        "",
        " = = History = = \n",
        "",
        "",
        " The island was first mapped in 1901 by a survey ship , the <unk> . \n",
        "",
    ]
    # the perplexity text: rows joined with "\n\n", as the SparseGPT/Wanda recipe does
    ids = data.tokenize_joined(tokenizer, src.docs)
    assert tokenizer.decode(ids).startswith("\n\n = Fixture Island = \n\n\n\n\n Fixture Island is")


def test_jsonl_parquet_folder(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    pq.write_table(pa.table({"body": ["three"]}), tmp_path / "b.parquet")
    assert data.load_text(str(tmp_path / "d" / "a.jsonl")).docs == ["one", "two"]
    assert data.load_text(str(tmp_path / "b.parquet"), field="body").docs == ["three"]
    with pytest.raises(UserError, match="no column 'text'"):
        data.load_text(str(tmp_path / "b.parquet"))
    assert data.load_text(str(tmp_path / "d")).docs == ["one", "two"]


@pytest.mark.standard_data("c4/c4_train_shard0_first1000.jsonl")
def test_c4_jsonl(shared_data):
    src = data.load_text(str(shared_data / "c4" / "c4_train_shard0_first1000.jsonl"))
    assert len(src.docs) == 1000


def test_c4_style_jsonl_on_fixture(fixture_data):
    train = data.load_text(str(fixture_data / "c4" / "c4_train_shard0_first1000.jsonl"))
    assert train.docs == [
        "Fresh bread every morning!\nOur bakery opens at 7am and closes when the bread runs out. Come early for the rye.",
        "How to fix a squeaky door hinge\nA drop of oil on the hinge pin usually does it. Wipe off the extra with a rag.",
        "Our café now serves breakfast all day.\nTry the pancakes with fresh berries.",  # "\u00e9" in the file
        "Local team wins the final 2-1\nThe winning goal came in the last minute of extra time.",
    ]
    held = data.load_text(str(fixture_data / "c4" / "c4_validation_2k.jsonl"), split="eval")
    assert len(held.docs) == 3 and held.docs[0] == "Weekend market opens at nine.\nStalls sell fruit, cheese and crêpes until noon."
    assert data.load_text(str(fixture_data / "c4")).docs == train.docs + held.docs  # a folder: files in name order


def _json_styles(line):
    """The ways (compact?, ensure_ascii?, "/" as "\\/"?) of json.dumps that write ``line`` back byte for byte."""
    obj = json.loads(line)
    styles = set()
    for compact in (True, False):
        for ascii_ in (True, False):
            text = json.dumps(obj, ensure_ascii=ascii_, separators=(",", ":") if compact else None)
            styles |= {(compact, ascii_, slash) for slash in (False, True)
                       if (text.replace("/", "\\/") if slash else text) == line}
    return styles


@pytest.mark.standard_data()
def test_fixture_files_follow_the_standard_layout(shared_data, fixture_data):
    """The made-up files have the real files' names, field names and order, JSON style and line structure."""
    from tiny import STANDARD_FILES

    made = sorted(str(p.relative_to(fixture_data)) for p in fixture_data.rglob("*") if p.is_file())
    assert made == sorted(STANDARD_FILES)
    for rel in STANDARD_FILES:
        real, fake = shared_data / rel, fixture_data / rel
        assert real.is_file(), rel
        if rel.endswith(".parquet"):
            assert pq.read_schema(fake).remove_metadata() == pq.read_schema(real).remove_metadata(), rel
            continue
        real_lines = real.read_bytes().decode("utf-8").split("\n")[:300]
        fake_text = fake.read_bytes().decode("utf-8")
        assert fake_text.endswith("\n") and "\r" not in fake_text, rel
        fake_lines = fake_text.split("\n")[:-1]
        if rel.endswith(".jsonl"):
            real_rows = [line for line in real_lines[:-1] if line]
            keys = list(json.loads(real_rows[0]))
            style = set.intersection(*map(_json_styles, real_rows))
            assert style, rel
            for line in fake_lines:
                assert list(json.loads(line)) == keys, rel
                assert _json_styles(line) & style, (rel, line)
        elif rel.endswith(".lst"):
            assert all(line in {"0", "1", "2"} for line in fake_lines + real_lines[:-1]), rel
        elif rel.endswith("hellaswag_val_full.txt"):
            assert len(fake_lines) % 6 == 0 and len(real_lines) >= 12
            for lines in (fake_lines, real_lines):
                assert all(lines[i] in {"0", "1", "2", "3"} for i in range(1, len(lines) - 6, 6)), rel
                assert all(": " in lines[i] for i in range(0, len(lines) - 6, 6)), rel
        else:  # wiki.valid.raw
            for lines in (fake_lines, real_lines[:-1]):
                assert all(line.startswith(" ") and line.endswith(" ") for line in lines), rel


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
