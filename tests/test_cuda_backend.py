"""``semisparse.load(OUT, backend="semi-structured")``, proven on the CPU: without CUDA, or for a pattern other than
2:4, one line and the dense float path; with the device check passed and a converter standing in for
``torch.sparse.to_sparse_semi_structured`` (the dense masked weight), the module swap, the per-shape timing with an
injected timer, the probe that catches a wrong conversion, shapes torch does not take, SLoRB layers, the record, and
bad input. The real kernel runs only with CUDA (skipped here; benchmarks/gpu_suite.py covers it)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import semisparse
from clirun import one_line_error
from semisparse import api
from semisparse import data as data_mod
from semisparse.errors import UserError
from semisparse.export import cuda_backend
from semisparse.export.cuda_backend import Measure, SemiStructuredLinear
from semisparse.export.load import load_export
from tiny import make_gpt2, make_tokenizer, save_model_dir

IDS = torch.tensor([[5, 17, 42, 99, 150, 3, 77, 201, 8, 64, 120, 33]])
SKIP_CUDA = "needs CUDA: covered by benchmarks/gpu_suite.py when a GPU is lent"
#: The tiny Llama's sparse layers: q/o [64, 64], k/v [32, 64], gate/up [128, 64], down [64, 128].
SHAPES = {(64, 64), (32, 64), (128, 64), (64, 128)}


def dense_copy(weight):
    """Stands in for to_sparse_semi_structured on the CPU: the dense masked weight, so F.linear computes the same."""
    return weight.clone()


def kernel_wins(path, shape, tokens, fn):
    fn()  # the swapped layer runs, so a shape error would show here
    return 0.0 if path == "kernel" else 1.0


def kernel_loses(path, shape, tokens, fn):
    return 1.0 if path == "kernel" else 0.0


FORCE = Measure(timer=kernel_wins, convert=dense_copy, say=None)


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max()) / float(want.abs().max())


def load_semi(out, measure=FORCE, dtype=None):
    return load_export(out, "cpu", dtype, backend="semi-structured", measure=measure)[0]


def swapped(model) -> int:
    return sum(isinstance(m, SemiStructuredLinear) for m in model.modules())


@pytest.fixture
def on_gpu(monkeypatch):
    """The device check passes on the CPU (the injected converter and timer stand in for the kernels)."""
    monkeypatch.setattr(cuda_backend, "device_unavailable", lambda device: None)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("semi-exports")
    api.prune(str(tiny_dir), "magnitude", "2:4", out=root / "run", device="cpu", progress=False)
    for quant in ("none", "int8"):
        api.export(root / "run", root / quant, dtype="fp16", quant=quant)
    api.export(root / "run", root / "fp32", dtype="fp32")
    api.prune(str(tiny_dir), "magnitude", "4:8", out=root / "run48", device="cpu", progress=False)
    api.export(root / "run48", root / "4of8", dtype="fp16")
    return root


# ------------------------------------------------------------------------------------------ unavailable: dense


def test_on_the_cpu_it_says_so_in_one_line_and_runs_dense(exports):
    lines = []
    model = load_semi(exports / "none", Measure(say=lines.append))  # torch's converter and the real timer
    assert lines == ["semi-structured backend unavailable: it needs a CUDA GPU (the device is cpu); running the dense "
                     "float path (float16)"]
    report = model.semisparse_backend
    assert report["available"] is False and report["unavailable_reason"].startswith("it needs a CUDA GPU")
    assert report["kernel_layers"] == 0 and report["float_layers"] == 14 and report["impl"] is None
    assert all(r == {"shape": r["shape"], "path": "float", "reason": "the backend is unavailable"}
               for r in report["layers"].values())
    assert swapped(model) == 0 and model.dtype == torch.float16
    assert torch.equal(logits(model), logits(semisparse.load(exports / "none")))  # exactly the float path


def test_a_pattern_other_than_2_4_runs_dense_even_on_a_gpu(exports, on_gpu):
    lines = []
    model = load_semi(exports / "4of8", Measure(timer=kernel_wins, convert=dense_copy, say=lines.append))
    assert lines == ["semi-structured backend unavailable: the export's pattern is 4:8; the semi-structured kernels "
                     "run 2:4 only; running the dense float path (float16)"]
    assert model.semisparse_backend["kernel_layers"] == 0 and swapped(model) == 0


def test_the_device_reasons(monkeypatch):
    assert cuda_backend.device_unavailable("cpu") == "it needs a CUDA GPU (the device is cpu)"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert "compute capability 8.0 (Ampere) or newer; this GPU is 7.5" in cuda_backend.device_unavailable("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: False)
    assert "no cuSPARSELt" in cuda_backend.device_unavailable("cuda")
    monkeypatch.setattr(torch.sparse.SparseSemiStructuredTensor, "_FORCE_CUTLASS", True)
    assert cuda_backend.device_unavailable("cuda") is None  # CUTLASS needs no cuSPARSELt


def test_eval_on_the_cpu_runs_dense_and_records_why(exports, tmp_path, text, cli):
    out = tmp_path / "eval.json"
    r = cli("eval", exports / "none", "--ppl", text, "--ppl-seqlen", "32", "--backend", "semi-structured",
            "--device", "cpu", "--out", out)
    assert r.returncode == 0, r.stderr
    assert [line for line in r.stdout.splitlines() if "semi-structured" in line] == [
        "semi-structured backend unavailable: it needs a CUDA GPU (the device is cpu); running the dense float path "
        "(float16)"]
    record = json.loads(out.read_text())
    assert record["backend"]["backend"] == "semi-structured" and record["backend"]["available"] is False
    source = data_mod.load_text(str(text), split="eval")
    want = api.ppl_eval(semisparse.load(exports / "none"), make_tokenizer(), source, seqlen=32, progress=False).ppl
    assert record["perplexity"][str(text)]["ppl"] == pytest.approx(want)


def test_bench_takes_the_backend(exports, tmp_path):
    lines = []
    r = api.bench(exports / "none", backend="semi-structured", json=tmp_path / "b.json", say=lines.append,
                  prefill_tokens=8, new_tokens=2, batches=(1,), repeats=1)
    assert r["backend"] == "semi-structured" and r["backend_choice"]["available"] is False
    assert sum("semi-structured backend unavailable" in line for line in lines) == 1


# ------------------------------------------------------------------------------------------ the swap and the choice


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_the_swap_with_a_stand_in_converter(exports, on_gpu, quant):
    """Every layer swapped (an int8 export de-quantized to fp16 first): logits and greedy tokens of the float path."""
    out = exports / quant
    model = load_semi(out)
    report = model.semisparse_backend
    assert report["available"] is True and report["kernel_layers"] == 14 and report["float_layers"] == 0
    assert report["impl"] == "the injected converter dense_copy" and report["measured_tokens"] == [1, 8, 512]
    assert swapped(model) == 14 and model.dtype == torch.float16
    layer = report["layers"]["model.layers.1.mlp.down_proj"]
    assert layer["shape"] == [64, 128] and layer["path"] == "kernel" and layer["probe_error"] == 0.0
    assert set(layer["timings"]) == {"1", "8", "512"}
    reference = semisparse.load(out)
    assert rel_error(logits(model), logits(reference)) <= 1e-3  # same fp16 weights, reshaped inputs
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(IDS[:, :4], **kw), reference.generate(IDS[:, :4], **kw))


def test_gpt2_conv1d_layers_are_swapped_as_out_in(tmp_path, on_gpu):
    """GPT-2 stores Conv1D weights [in, out]: the swapped layer takes the [out, in] view and computes the same."""
    run = tmp_path / "run"
    api.prune(str(save_model_dir(make_gpt2(), make_tokenizer(), tmp_path / "gpt2")), "magnitude", "2:4", out=run,
              device="cpu", progress=False)
    api.export(run, tmp_path / "out", dtype="fp16")
    model = load_semi(tmp_path / "out")
    assert model.semisparse_backend["kernel_layers"] == swapped(model) == len(model.semisparse_backend["layers"]) > 0
    assert rel_error(logits(model), logits(semisparse.load(tmp_path / "out"))) <= 1e-3


def test_slower_sparse_matmuls_keep_the_dense_layers(exports, on_gpu):
    model = load_semi(exports / "none", Measure(timer=kernel_loses, convert=dense_copy, say=None))
    report = model.semisparse_backend
    assert report["kernel_layers"] == 0 and swapped(model) == 0
    assert all("not faster than the dense one at 1, 8, 512 token(s)" in r["reason"] for r in report["layers"].values())


def test_only_the_faster_shape_switches_one_timing_per_shape(exports, on_gpu):
    """A timer that makes only the MLP's [128, 64] shape faster: exactly those layers are swapped."""
    seen, lines = [], []

    def timer(path, shape, tokens, fn):
        seen.append((path, shape, tokens))
        return 0.0 if (path == "kernel") == (shape == (128, 64)) else 1.0

    model = load_semi(exports / "none", Measure(tokens=(1, 16), timer=timer, convert=dense_copy, say=lines.append))
    layers = model.semisparse_backend["layers"]
    assert {name for name, r in layers.items() if r["path"] == "kernel"} == {
        f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj")}
    assert swapped(model) == 4 and model.semisparse_backend["measured_tokens"] == [1, 16]
    assert {s for _, s, _ in seen} == SHAPES and len(seen) == len(set(seen)) == 4 * 2 * 2  # per shape, not layer
    assert lines[0] == ("semi-structured backend: 4 of 14 sparse layers through the injected converter dense_copy "
                        "(2:4), activations float16 (the export dtype)")
    assert any(line.strip().startswith("[128, 64] (4 layers): kernel: measured faster") for line in lines)
    assert any(line.strip().startswith("[64, 64] (4 layers): float: the sparse matmul measured not faster")
               for line in lines)


def test_a_wrong_conversion_is_caught_by_the_probe(exports, on_gpu):
    def off_by_5_percent(weight):
        return weight * 1.05

    model = load_semi(exports / "none", Measure(timer=kernel_wins, convert=off_by_5_percent, say=None))
    report = model.semisparse_backend
    assert report["kernel_layers"] == 0 and swapped(model) == 0
    assert all("differs from the dense layer" in r["reason"] and "tolerance 1e-02" in r["reason"]
               for r in report["layers"].values())


def test_every_layer_is_probed_not_only_one_per_shape(exports, on_gpu):
    """Wrong only on its first call: that layer stays dense, the other layer of its shape takes the sparse path."""
    calls = []

    def wrong_once(weight):
        calls.append(weight.shape)
        return weight * (2.0 if len(calls) == 1 else 1.0)

    model = load_semi(exports / "none", Measure(timer=kernel_wins, convert=wrong_once, say=None))
    layers = model.semisparse_backend["layers"]
    first = next(iter(layers))
    assert {name for name, r in layers.items() if r["path"] == "float"} == {first}
    same_shape = [r for name, r in layers.items() if name != first and r["shape"] == layers[first]["shape"]]
    assert same_shape and all(r["path"] == "kernel" for r in same_shape)
    assert swapped(model) == 13


def test_a_converter_that_raises_keeps_the_layer_dense(exports, on_gpu):
    def refuses(weight):
        raise RuntimeError("Error original_tensor.shape is not supported!\nmore detail")

    model = load_semi(exports / "none", Measure(timer=kernel_wins, convert=refuses, say=None))
    assert all(r["reason"] == "the sparse kernel failed: Error original_tensor.shape is not supported!"
               for r in model.semisparse_backend["layers"].values())

    def fails_at_one_token(path, shape, tokens, fn):
        if path == "kernel" and tokens == 1:
            raise RuntimeError("CUDA error: misaligned address")
        return kernel_wins(path, shape, tokens, fn)

    model = load_semi(exports / "none", Measure(timer=fails_at_one_token, convert=dense_copy, say=None))
    assert swapped(model) == 0 and all(r["reason"] == "the sparse kernel failed while timed: CUDA error: misaligned "
                                       "address" for r in model.semisparse_backend["layers"].values())


def test_unsupported_shapes_name_the_reason(monkeypatch):
    assert cuda_backend.unsupported((32, 64), torch.float16) is None  # cuSPARSELt: multiples of 16
    assert "out_features 24 is not a multiple of 16 (cuSPARSELt's float16" in cuda_backend.unsupported(
        (24, 64), torch.float16)
    assert "in_features 40" in cuda_backend.unsupported((64, 40), torch.bfloat16)
    assert "no torch.float32 kernel" in cuda_backend.unsupported((64, 64), torch.float32)
    monkeypatch.setattr(torch.sparse.SparseSemiStructuredTensor, "_FORCE_CUTLASS", True)
    assert cuda_backend.impl_name() == "CUTLASS"
    assert "in_features 32 is not a multiple of 64 (CUTLASS's" in cuda_backend.unsupported((32, 32), torch.float16)
    assert cuda_backend.unsupported((32, 64), torch.float16) is None


def test_shapes_the_kernels_do_not_take_stay_dense(tmp_path, on_gpu):
    """hidden 48, 4 heads of 12, 2 KV heads: k_proj/v_proj have 24 outputs, not a multiple of cuSPARSELt's 16."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=384, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    model_dir = save_model_dir(LlamaForCausalLM(cfg).eval(), make_tokenizer(), tmp_path / "model")
    api.prune(str(model_dir), "magnitude", "2:4", out=tmp_path / "run", device="cpu", progress=False)
    api.export(tmp_path / "run", tmp_path / "out", dtype="bf16")
    model = load_semi(tmp_path / "out")
    layers = model.semisparse_backend["layers"]
    stayed = {name.rpartition(".")[2]: r["reason"] for name, r in layers.items() if r["path"] == "float"}
    assert set(stayed) == {"k_proj", "v_proj"} and all("out_features 24" in why for why in stayed.values())
    assert model.semisparse_backend["kernel_layers"] == swapped(model) == 5
    assert model.semisparse_backend["activation_dtype"] == "bfloat16"


def test_slorb_layers_stay_dense(exports, on_gpu):
    from semisparse.export.format import verify
    from semisparse.export.load import _load_packed
    from semisparse.train.sparse_linear import attach_slorb

    out = exports / "none"
    manifest = verify(out)
    model = _load_packed(out, manifest, torch.float16)
    name = "model.layers.0.mlp.up_proj"
    torch.manual_seed(0)
    attach_slorb(model, {f"{name}.slorb_S": torch.randn(128, 4) * 0.01, f"{name}.slorb_X": torch.randn(4, 64)})
    layers = {n: tuple(r["shape"]) for n, r in manifest["layers"].items()}
    report = cuda_backend.apply_semi_structured(model, layers, torch.float16, "test", None, FORCE)
    assert report["layers"][name] == {"shape": [128, 64], "path": "float", "reason": "it carries a SLoRB branch"}
    assert report["kernel_layers"] == 13


# ------------------------------------------------------------------------------------------ dtype, timer


def test_activation_dtypes(exports, on_gpu):
    assert cuda_backend.activation_dtype(None, "fp16", True) == (torch.float16, "the export dtype")
    assert cuda_backend.activation_dtype(torch.bfloat16, "fp16", True) == (torch.bfloat16, "asked for")
    dtype, why = cuda_backend.activation_dtype(None, "fp32", True)
    assert dtype == torch.bfloat16 and "fp16 or bf16" in why
    assert cuda_backend.activation_dtype(None, "fp32", False)[0] == torch.float32  # dense: as backend none
    assert load_semi(exports / "fp32").dtype == torch.bfloat16


def test_the_cuda_timer_falls_back_to_wall_time_without_cuda():
    seconds = cuda_backend.cuda_median_seconds("kernel", (4, 4), 1, lambda: torch.ones(4) @ torch.ones(4))
    assert 0 < seconds < 1


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input_is_one_line(exports, tmp_path, text, cli):
    with pytest.raises(UserError, match="float16 or bfloat16, not torch.float32"):
        semisparse.load(exports / "none", backend="semi-structured", dtype=torch.float32)
    with pytest.raises(UserError, match="token counts must be positive"):
        Measure(tokens=(0, 8))
    api.export(exports / "run", tmp_path / "hf", format="hf")
    with pytest.raises(UserError, match="an hf export: export it with --format packed"):
        semisparse.load(tmp_path / "hf", backend="semi-structured")
    for folder, backend, msg in [(exports / "none", "semi_structured", "unknown --backend 'semi_structured' "
                                  "(choose from none, cpu, semi-structured)"),
                                 (tmp_path / "hf", "semi-structured", "--format packed")]:
        r = cli("eval", folder, "--ppl", text, "--ppl-seqlen", "32", "--backend", backend, "--device", "cpu",
                "--out", tmp_path / "eval.json")
        assert msg in one_line_error(r)
    assert not (tmp_path / "eval.json").exists()


# ------------------------------------------------------------------------------------------ the real kernel


@pytest.mark.skipif(not torch.cuda.is_available(), reason=SKIP_CUDA)
def test_the_real_kernel_on_cuda(exports):
    """torch's conversion and kernel (every layer forced through it): logits of the float path within the probe's
    fp16 tolerance, at token counts torch must pad (3, 13)."""
    if cuda_backend.device_unavailable("cuda"):
        pytest.skip(cuda_backend.device_unavailable("cuda"))
    out = exports / "none"
    model = load_export(out, "cuda", backend="semi-structured", measure=Measure(timer=kernel_wins, say=None))[0]
    assert swapped(model) == 14
    reference = semisparse.load(out, device="cuda")
    for ids in (IDS[:, :3], IDS, torch.cat([IDS, IDS[:, :1]], dim=1)):
        assert rel_error(logits(model, ids.cuda()), logits(reference, ids.cuda())) <= 1e-2
