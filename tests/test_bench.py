"""``semisparse bench``: the record's structure (three models, every number positive and finite, the machine and
versions, the cpu backend's choice), the JSON file (atomic, default name), and bad input. Tiny sizes; speed is
never asserted."""

from __future__ import annotations

import json
import math

import pytest

from clirun import one_line_error
from semisparse import api
from semisparse.bench import CPU_FLAGS, cpu_name

TINY = dict(prefill_tokens=16, new_tokens=3, batches=(1, 2), repeats=1)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("bench")
    api.prune(str(tiny_dir), "magnitude", "2:4", out=root / "run", device="cpu", progress=False)
    for quant in ("int4", "none"):
        api.export(root / "run", root / quant, dtype="fp16", quant=quant)
    return root


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_bench_record(exports, tmp_path):
    lines = []
    out = tmp_path / "bench.json"
    r = api.bench(exports / "int4", json=out, say=lines.append, **TINY)
    assert json.loads(out.read_text()) == json.loads(json.dumps({k: v for k, v in r.items() if k != "json"}))
    assert r["json"] == str(out) and r["backend"] == "cpu" and r["device"] == "cpu"
    assert r["settings"] == {"prefill_tokens": 16, "new_tokens": 3, "batches": [1, 2], "prompt_tokens": 8,
                             "repeats": 1}
    assert set(r["models"]) == {"dense-fp32", "dense-bf16", "export"}
    for name, m in r["models"].items():
        assert positive(m["prefill_tokens_per_s"]) and m["prefill_tokens"] == 16, name
        assert set(m["decode_tokens_per_s"]) == {"1", "2"} and all(map(positive, m["decode_tokens_per_s"].values()))
        assert positive(m["peak_rss_bytes"]) and positive(m["bytes_on_disk"]) and positive(m["load_seconds"])
    assert [r["models"][k]["dtype"] for k in ("dense-fp32", "dense-bf16")] == ["float32", "bfloat16"]
    # bytes: the dense checkpoints' weights at 4 and 2 bytes each; the export is its folder on disk
    dense = r["models"]["dense-fp32"]["bytes_on_disk"]
    assert dense == 2 * r["models"]["dense-bf16"]["bytes_on_disk"]
    assert r["models"]["export"]["bytes_on_disk"] == sum(p.stat().st_size for p in (exports / "int4").iterdir())
    for base in ("dense-fp32", "dense-bf16"):
        ratio = r["ratios"][f"export/{base}"]
        assert set(ratio) == {"prefill", "decode_batch_1", "decode_batch_2", "peak_rss", "bytes_on_disk"}
        assert all(map(positive, ratio.values()))
        assert ratio["bytes_on_disk"] == pytest.approx(r["models"]["export"]["bytes_on_disk"]
                                                       / r["models"][base]["bytes_on_disk"])
    assert set(r["machine"]["flags"]) == set(CPU_FLAGS) and r["machine"]["cpu"] == cpu_name()
    assert {"torch", "transformers"} <= set(r["versions"])
    choice = r["backend_choice"]
    assert choice["backend"] == "cpu" and len(choice["layers"]) == 14
    assert choice["kernel_layers"] + choice["float_layers"] == 14
    # printed: the machine and versions first, then one line per model, the backend's choice among them
    assert lines[0].startswith("bench on ") and "torch" in lines[0] and "transformers" in lines[0]
    assert any(line.startswith("cpu backend: ") for line in lines)
    assert [line.split(":")[0] for line in lines if "tok/s" in line] == ["dense-fp32", "dense-bf16",
                                                                         "export (cpu backend)"]


def test_cli_bench_unquantized_export_and_default_json(exports, tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = cli("bench", exports / "none", "--prefill-tokens", "8", "--new-tokens", "2", "--batch", "1", "--repeats", "1")
    assert r.returncode == 0, r.stderr
    record = json.loads((tmp_path / "bench-none.json").read_text())
    assert record["backend"] == "none" and record["backend_choice"] is None
    export = record["models"]["export"]
    assert export["dtype"] == "float16" and set(export["decode_tokens_per_s"]) == {"1"}
    assert "export/dense-fp32" in r.stdout and "results written to bench-none.json" in r.stdout


@pytest.mark.parametrize("args,msg", [
    (["--backend", "gpu"], "unknown --backend 'gpu'"),
    (["--new-tokens", "0"], "--new-tokens must be positive"),
    (["--batch", "0"], "--batch sizes must be positive"),
])
def test_bad_bench_input_is_one_line(exports, tmp_path, cli, args, msg):
    out = tmp_path / "b.json"
    assert msg in one_line_error(cli("bench", exports / "int4", "--json", out, *args))
    assert not out.exists()


def test_bench_refuses_what_it_cannot_run(exports, tmp_path, cli):
    out = tmp_path / "b.json"
    assert "not an exported folder" in one_line_error(cli("bench", exports / "run", "--json", out))
    assert "--quant int8 or int4" in one_line_error(cli("bench", exports / "none", "--backend", "cpu",
                                                        "--json", out, "--new-tokens", "1", "--prefill-tokens", "4"))
    assert "is a folder" in one_line_error(cli("bench", exports / "int4", "--json", tmp_path))
    assert not out.exists()
