"""``semisparse.load(OUT, backend="cpu")``: torch's weight-only int8/int4 CPU kernels against the de-quantized float
path (one layer against q·s laid out by boolean indexing; whole tiny models' logits, greedy generations and
perplexity), the per-layer choice with an injected timer, shapes the kernels do not take, the probe that catches a
wrong kernel, SLoRB layers, and bad input (an unquantized export, an unknown backend, a CUDA device)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import semisparse
from clirun import one_line_error
from semisparse import api
from semisparse.errors import UserError
from semisparse.export import cpu_backend
from semisparse.export.cpu_backend import Measure, QuantizedLayer, kernel_layer
from semisparse.export.load import load_export
from semisparse.export.pack import pack_layer
from semisparse.export.quant import dequantize, quantize
from semisparse.masks import Pattern, nm_mask
from tiny import VOCAB, make_tokenizer, save_model_dir

IDS = torch.tensor([[5, 17, 42, 99, 150, 3, 77, 201, 8, 64, 120, 33]])
# Stated tolerances, max |logit difference| / max |logit| of the float path: float32 activations compute the same
# q·s weights in another summation order (measured ~1e-7); bf16 activations round inputs, weights' scales and
# partial sums to bf16 (measured ~4e-3, the same as the float path's own bf16 rounding).
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def kernel_wins(path, shape, tokens, fn):
    fn()  # the kernel runs, so a crash or a shape error would show here
    return 0.0 if path == "kernel" else 1.0


def kernel_loses(path, shape, tokens, fn):
    return 1.0 if path == "kernel" else 0.0


FORCE = Measure(timer=kernel_wins, say=None)


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max()) / float(want.abs().max())


def load_cpu(out, dtype=None, measure=FORCE):
    return load_export(out, "cpu", dtype, backend="cpu", measure=measure)[0]


# ------------------------------------------------------------------------------------------ one layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme,pattern,shape,group", [
    ("int8", "2:4", (48, 64), None),
    ("int8", "1:4", (16, 96), None),
    ("int4", "2:4", (32, 128), 32),   # kernel group 64
    ("int4", "2:4", (16, 384), 96),   # kernel group 64, each scale repeated 3 times
    ("int4", "4:8", (48, 256), 64),   # kernel group 128
])
def test_kernel_layer_computes_the_dequantized_weight(scheme, pattern, shape, group, dtype):
    torch.manual_seed(0)
    pat = Pattern.parse(pattern)
    weight = torch.randn(shape)
    mask = nm_mask(weight.abs(), pat)
    packed = pack_layer(weight, mask, pat)
    q = quantize(packed.values, scheme, group, torch.float16)
    layer = QuantizedLayer(codes=q.codes, scales=q.scales, positions=packed.positions, shape=shape,
                           width=packed.values.shape[1], group_size=q.group_size)
    assert cpu_backend.unsupported(scheme, layer, pat, dtype) is None
    # the reference: q·s in float64 put back where the mask keeps, by boolean indexing (not unpack_layer)
    dense = torch.zeros(shape, dtype=torch.float64)
    dense[mask] = dequantize(q.codes, q.scales, scheme, q.group_size, tuple(packed.values.shape)).double().reshape(-1)
    x = torch.randn(5, shape[1])
    want = x.double() @ dense.T
    kernel = kernel_layer(scheme, layer, pat, dtype, bias=None)
    got = kernel(x.to(dtype)).double()
    assert got.dtype == torch.float64 and kernel(x.to(dtype)).dtype == dtype
    assert rel_error(got, want) <= RTOL[dtype]
    # leading dimensions pass through (the model calls it with [batch, tokens, in])
    assert kernel(x[None].to(dtype)).shape == (1, 5, shape[0])


@pytest.mark.realmodel
def test_real_layers_of_the_shipped_model():
    """SmolLM2-135M's attention and MLP shapes (in 576 and 1536, int4 groups of 32 and 128 kept values) with its
    own weights, 2:4 by magnitude: each kernel against q·s laid out by boolean indexing."""
    from semisparse.layers import weight_matrix
    from semisparse.models import load_model

    model = load_model("default").model
    pat = Pattern.parse("2:4")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.3.mlp.gate_proj", "model.layers.5.mlp.down_proj"):
        weight = weight_matrix(model.get_submodule(name)).detach().clone()
        mask = nm_mask(weight.abs(), pat)
        packed = pack_layer(weight, mask, pat)
        width = packed.values.shape[1]
        x = torch.randn(8, weight.shape[1], generator=torch.Generator().manual_seed(0))
        for scheme in ("int8", "int4"):
            q = quantize(packed.values, scheme, max(g for g in (128, 64, 32) if width % g == 0), torch.float16)
            layer = QuantizedLayer(codes=q.codes, scales=q.scales, positions=packed.positions,
                                   shape=tuple(weight.shape), width=width, group_size=q.group_size)
            dense = torch.zeros(weight.shape, dtype=torch.float64)
            values = dequantize(q.codes, q.scales, scheme, q.group_size, (weight.shape[0], width))
            dense[mask] = values.double().flatten()
            want = x.double() @ dense.T
            for dtype in (torch.float32, torch.bfloat16):
                got = kernel_layer(scheme, layer, pat, dtype, bias=None)(x.to(dtype)).double()
                assert rel_error(got, want) <= RTOL[dtype], (name, scheme, dtype)


def test_unsupported_shapes_name_the_reason():
    pat = Pattern.parse("2:4")

    def layer(shape, group):
        return QuantizedLayer(codes=None, scales=None, positions=None, shape=shape, width=shape[1] // 2,
                              group_size=group)

    assert "multiple of 16" in cpu_backend.unsupported("int8", layer((64, 40), 20), pat, torch.bfloat16)
    assert cpu_backend.unsupported("int8", layer((64, 40), 20), pat, torch.float32) is None
    assert "out_features 24" in cpu_backend.unsupported("int4", layer((24, 64), 32), pat, torch.float32)
    assert "group of 8" in cpu_backend.unsupported("int4", layer((32, 64), 8), pat, torch.float32)
    assert cpu_backend.int4_kernel_group(32, pat) == 64 and cpu_backend.int4_kernel_group(128, pat) == 256
    assert cpu_backend.int4_kernel_group(256, pat) == 256  # 512 dense columns: groups of 256, scale repeated
    assert cpu_backend.int4_kernel_group(9, Pattern.parse("3:4")) is None  # 12 dense columns


# ------------------------------------------------------------------------------------------ whole models


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("runs") / "llama-2of4"
    api.prune(str(tiny_dir), "magnitude", "2:4", out=out, device="cpu", progress=False)
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory, run_dir):
    root = tmp_path_factory.mktemp("exports")
    for quant in ("int8", "int4", "none"):
        api.export(run_dir, root / quant, dtype="fp16", quant=quant)
    return root


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_logits_equal_the_float_path(exports, quant, dtype):
    out = exports / quant
    model = load_cpu(out, dtype)
    report = model.semisparse_backend
    assert report["kernel_layers"] == 14 and report["float_layers"] == 0
    assert sum(isinstance(m, cpu_backend.WeightOnlyLinear) for m in model.modules()) == 14
    reference = semisparse.load(out, dtype=torch.float32)  # the de-quantized float path, no backend
    assert rel_error(logits(model), logits(reference)) <= RTOL[dtype]
    assert model.config.name_or_path == reference.config.name_or_path == str(out)  # as from_pretrained names it
    if dtype == torch.float32:  # greedy decoding with the KV cache picks the same tokens
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(IDS[:, :4], **kw), reference.generate(IDS[:, :4], **kw))


def test_perplexity_equals_the_float_path_to_4_digits(exports, text):
    from semisparse import data as data_mod

    source = data_mod.load_text(str(text), split="eval")
    out = exports / "int4"
    tokenizer = make_tokenizer()
    got = api.ppl_eval(load_cpu(out, torch.float32), tokenizer, source, seqlen=32, progress=False).ppl
    want = api.ppl_eval(semisparse.load(out, dtype=torch.float32), tokenizer, source, seqlen=32, progress=False).ppl
    assert f"{got:.4g}" == f"{want:.4g}"


def test_slower_kernels_keep_the_float_layers(exports):
    out = exports / "int8"
    model = load_cpu(out, torch.bfloat16, Measure(timer=kernel_loses, say=None))
    report = model.semisparse_backend
    assert report["kernel_layers"] == 0
    assert all("slower" in r["reason"] and r["path"] == "float" for r in report["layers"].values())
    assert not any(isinstance(m, cpu_backend.WeightOnlyLinear) for m in model.modules())
    assert torch.equal(logits(model), logits(semisparse.load(out, dtype=torch.bfloat16)))


def test_the_choice_is_per_shape_measured_and_printed(exports):
    """A timer that makes only the MLP's [128, 64] shape faster: exactly those layers take the kernel."""
    seen, lines = [], []

    def timer(path, shape, tokens, fn):
        seen.append((path, shape, tokens))
        return 0.0 if (path == "kernel") == (shape == (128, 64)) else 1.0

    model = load_cpu(exports / "int4", torch.float32, Measure(tokens=(1, 4), timer=timer, say=lines.append))
    layers = model.semisparse_backend["layers"]
    kernel = {name for name, r in layers.items() if r["path"] == "kernel"}
    assert kernel == {f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj")}
    assert model.semisparse_backend["measured_tokens"] == [1, 4]
    # one measurement per distinct shape and token count, not per layer
    assert len(seen) == len(set(seen)) == 4 * 2 * 2
    assert lines[0].startswith("cpu backend: 4 of 14 sparse layers through the int4 kernel")
    assert any(line.strip().startswith("[128, 64] (4 layers): kernel") for line in lines)


def test_a_wrong_kernel_is_caught_by_the_probe(exports, monkeypatch):
    real = cpu_backend.kernel_layer

    def off_by_a_bit(*args, **kwargs):
        layer = real(*args, **kwargs)
        layer.scales.mul_(1.01)  # 1 % off: far beyond the probe's float32 tolerance
        return layer

    monkeypatch.setattr(cpu_backend, "kernel_layer", off_by_a_bit)
    model = load_cpu(exports / "int8", torch.float32)
    assert model.semisparse_backend["kernel_layers"] == 0
    assert all("differs from the float path" in r["reason"] for r in model.semisparse_backend["layers"].values())


def _odd_llama(tmp_path, hidden, heads, kv_heads):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=384, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
                      tie_word_embeddings=True)
    model_dir = save_model_dir(LlamaForCausalLM(cfg).eval(), make_tokenizer(), tmp_path / "model")
    api.prune(str(model_dir), "magnitude", "2:4", out=tmp_path / "run", device="cpu", progress=False)
    return tmp_path / "run"


@pytest.mark.parametrize("quant,dtype,hidden,heads,kv_heads,float_layers,why", [
    # k_proj/v_proj have 8 outputs: the int4 packing needs a multiple of 16
    ("int4", torch.float32, 64, 8, 1, {"k_proj", "v_proj"}, "out_features 8"),
    # every layer but down_proj (input 80) reads 40 inputs: the bf16 int8 kernel needs a multiple of 16
    ("int8", torch.bfloat16, 40, 4, 2, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"},
     "in_features 40"),
])
def test_shapes_the_kernels_do_not_take_stay_float(tmp_path, quant, dtype, hidden, heads, kv_heads, float_layers,
                                                    why):
    out = tmp_path / "export"
    api.export(_odd_llama(tmp_path, hidden, heads, kv_heads), out, dtype="fp16", quant=quant)
    model = load_cpu(out, dtype)
    layers = model.semisparse_backend["layers"]
    stayed = {name.rpartition(".")[2] for name, r in layers.items() if r["path"] == "float"}
    assert stayed == float_layers
    assert all(why in r["reason"] for r in layers.values() if r["path"] == "float")
    assert model.semisparse_backend["kernel_layers"] == len(layers) - len(float_layers) > 0
    assert rel_error(logits(model), logits(semisparse.load(out, dtype=torch.float32))) <= RTOL[dtype]


def test_slorb_layers_stay_float(exports):
    from semisparse.export.format import verify
    from semisparse.export.load import _load_packed
    from semisparse.train.sparse_linear import attach_slorb

    out = exports / "int8"
    manifest = verify(out)
    model, quantized = _load_packed(out, manifest, torch.float32, keep_quantized=True)
    name = "model.layers.0.mlp.up_proj"
    torch.manual_seed(0)
    attach_slorb(model, {f"{name}.slorb_S": torch.randn(128, 4) * 0.01, f"{name}.slorb_X": torch.randn(4, 64)})
    want = logits(model)
    report = cpu_backend.apply_cpu_backend(model, quantized, Pattern.parse("2:4"), "int8", torch.float32, "test",
                                           FORCE)
    assert report["layers"][name] == {"shape": [128, 64], "scheme": "int8", "path": "float",
                                      "reason": "it carries a SLoRB branch"}
    assert report["kernel_layers"] == 13
    assert rel_error(logits(model), want) <= RTOL[torch.float32]


# ------------------------------------------------------------------------------------------ activation dtype


@pytest.mark.parametrize("feature,want", [("AVX-512 BF16", torch.bfloat16), ("AMX", torch.bfloat16),
                                          (None, torch.float32)])
def test_activations_are_bf16_only_with_native_bf16(monkeypatch, feature, want):
    monkeypatch.setattr("semisparse.devices.native_bf16_cpu", lambda: feature)
    dtype, reason = cpu_backend.activation_dtype(None)
    assert dtype == want and (feature or "no native bf16") in reason
    assert cpu_backend.activation_dtype(torch.float32) == (torch.float32, "asked for")


def test_the_default_dtype_follows_the_cpu(exports, monkeypatch):
    monkeypatch.setattr("semisparse.devices.native_bf16_cpu", lambda: None)
    model = semisparse.load(exports / "int8", backend="cpu")
    assert model.dtype == torch.float32 and model.semisparse_backend["activation_dtype"] == "float32"
    assert model.semisparse_backend["kernel_dtype"] == "bfloat16"


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_a_float32_model_runs_bf16_kernels_by_default(exports, monkeypatch, quant):
    """Without native bf16 the model stays float32 and the kernels take bf16 inputs (their float32 path is the slow
    one on every CPU measured): each kernel layer hands back float32, and the logits are the float path's within
    bf16's tolerance; float32 asked for explicitly keeps float32 kernels (float32's tolerance)."""
    monkeypatch.setattr("semisparse.devices.native_bf16_cpu", lambda: None)
    out = exports / quant
    reference = semisparse.load(out, dtype=torch.float32)
    lines = []
    model = load_export(out, "cpu", None, backend="cpu", measure=Measure(timer=kernel_wins, say=lines.append))[0]
    report = model.semisparse_backend
    assert model.dtype == torch.float32 and report["kernel_dtype"] == "bfloat16" and report["kernel_layers"] == 14
    kernels = [m for m in model.modules() if isinstance(m, cpu_backend.WeightOnlyLinear)]
    assert len(kernels) == 14 and all(k.scales_dtype == torch.bfloat16 for k in kernels)
    x = torch.randn(3, kernels[0].in_features)
    assert kernels[0](x).dtype == torch.float32
    error = rel_error(logits(model), logits(reference))
    assert error <= RTOL[torch.bfloat16]
    assert error > RTOL[torch.float32]  # the kernels really computed in bf16: the check can tell
    assert "the kernels in bfloat16" in lines[0]
    explicit = load_cpu(out, torch.float32)
    assert explicit.semisparse_backend["kernel_dtype"] == "float32"
    assert rel_error(logits(explicit), logits(reference)) <= RTOL[torch.float32]


def test_the_int8_head_in_a_float32_model(exports, monkeypatch):
    monkeypatch.setattr("semisparse.devices.native_bf16_cpu", lambda: None)
    out = exports / "int4"
    model = load_export(out, "cpu", None, backend="cpu", measure=FORCE, lm_head="int8")[0]
    head = model.get_output_embeddings()
    assert isinstance(head, cpu_backend.WeightOnlyLinear) and head.scales_dtype == torch.bfloat16
    assert model.semisparse_backend["lm_head"]["path"] == "kernel" and model.dtype == torch.float32
    reference = semisparse.load(out, dtype=torch.float32)
    assert logits(model).dtype == torch.float32
    assert rel_error(logits(model), logits(reference)) <= 2 * RTOL[torch.bfloat16]  # bf16 kernels + a rounded head


# ------------------------------------------------------------------------------------------ bad input


def test_bad_backends_are_one_line_errors(exports, tmp_path, run_dir, text, cli):
    with pytest.raises(UserError, match="unknown --backend 'gpu'"):
        semisparse.load(exports / "int8", backend="gpu")
    with pytest.raises(UserError, match="not quantized"):
        semisparse.load(exports / "none", backend="cpu")
    with pytest.raises(UserError, match="float32 or bfloat16"):
        semisparse.load(exports / "int8", backend="cpu", dtype=torch.float16)
    with pytest.raises(UserError, match="runs on the CPU"):
        load_export(exports / "int8", torch.device("cuda"), backend="cpu")
    api.export(run_dir, tmp_path / "hf", format="hf")
    with pytest.raises(UserError, match="an hf export"):
        semisparse.load(tmp_path / "hf", backend="cpu")
    for folder, backend, msg in [(exports / "int8", "gpu", "unknown --backend"), (exports / "none", "cpu",
                                                                                  "--quant int8 or int4")]:
        r = cli("eval", folder, "--ppl", text, "--ppl-seqlen", "32", "--backend", backend, "--device", "cpu",
                "--out", tmp_path / "eval.json")
        assert msg in one_line_error(r)
    assert not (tmp_path / "eval.json").exists()


def test_eval_with_the_cpu_backend(exports, tmp_path, text, cli):
    out = tmp_path / "eval.json"
    r = cli("eval", exports / "int4", "--ppl", text, "--ppl-seqlen", "32", "--backend", "cpu", "--device", "cpu",
            "--out", out)
    assert r.returncode == 0, r.stderr
    assert "cpu backend:" in r.stdout
    import json

    record = json.loads(out.read_text())
    assert record["backend"]["backend"] == "cpu" and record["perplexity"][str(text)]["ppl"] > 0


# ------------------------------------------------------------------------------------------ the LM head in int8


def int8_rows_float64(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round to nearest with one scale per row (max |w| / 127), in float64: (w / scale, scale), the head's reference."""
    w = weight.double()
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    return w / scale, scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lm_head_int8_computes_the_rounded_head(exports, dtype):
    out = exports / "int4"
    model = load_export(out, "cpu", dtype, backend="cpu", measure=FORCE, lm_head="int8")[0]
    head = model.get_output_embeddings()
    assert isinstance(head, cpu_backend.WeightOnlyLinear) and head.weight_int8.dtype == torch.int8
    assert model.semisparse_backend["lm_head"]["path"] == "kernel"
    reference = semisparse.load(out, dtype=torch.float32)  # tied head and embedding, float
    # the input embedding keeps its float weight (the tie is cut, only the output side is quantized)
    assert torch.equal(model.get_input_embeddings().weight.float(),
                       reference.get_input_embeddings().weight.to(dtype).float())
    # the codes are round(w / scale) but where w / scale sits within float32 rounding of a .5 boundary
    ratio, scale = int8_rows_float64(reference.get_output_embeddings().weight.detach().to(dtype))
    codes = head.weight_int8.double()
    assert bool(((codes == torch.round(ratio)) | ((ratio - ratio.floor() - 0.5).abs() < 1e-4)).all())
    assert torch.allclose(head.scales.double(), scale.squeeze(1), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    with torch.no_grad():
        hidden = reference.model(IDS).last_hidden_state.double()
    want = hidden @ (codes * scale).T
    got = logits(model).double()
    assert rel_error(got, want) <= RTOL[dtype]
    float_head = hidden @ reference.get_output_embeddings().weight.detach().double().T
    assert rel_error(float_head, want) > 10 * RTOL[torch.float32]  # the head really is rounded: the check can tell
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert model.generate(IDS[:, :4], **kw).shape == (1, 8)  # generate works with the kernel head


def test_lm_head_int8_stays_float_where_slower_or_not_asked(exports):
    out = exports / "int8"
    slow = load_export(out, "cpu", torch.float32, backend="cpu", measure=Measure(timer=kernel_loses, say=None),
                       lm_head="int8")[0]
    assert isinstance(slow.get_output_embeddings(), torch.nn.Linear)
    assert "slower than the float head" in slow.semisparse_backend["lm_head"]["reason"]
    plain = load_cpu(out, torch.float32)
    assert isinstance(plain.get_output_embeddings(), torch.nn.Linear)
    assert plain.semisparse_backend["lm_head"]["path"] == "float"
    assert plain.get_output_embeddings().weight is plain.get_input_embeddings().weight  # still tied


def test_lm_head_bad_choices_are_one_line_errors(exports, tmp_path, text, cli):
    with pytest.raises(UserError, match="add --backend cpu"):
        semisparse.load(exports / "int8", lm_head="int8")
    with pytest.raises(UserError, match="unknown --lm-head 'int4'"):
        semisparse.load(exports / "int8", backend="cpu", lm_head="int4")
    r = cli("eval", exports / "int8", "--ppl", text, "--ppl-seqlen", "32", "--lm-head", "int8", "--device", "cpu",
            "--out", tmp_path / "eval.json")
    assert "add --backend cpu" in one_line_error(r)
    assert not (tmp_path / "eval.json").exists()
    out = tmp_path / "ok.json"
    r = cli("eval", exports / "int8", "--ppl", text, "--ppl-seqlen", "32", "--backend", "cpu", "--lm-head", "int8",
            "--device", "cpu", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "lm_head [" in r.stdout
    import json

    head = json.loads(out.read_text())["backend"]["lm_head"]
    assert head["shape"] == [VOCAB, 64] and head["path"] in ("kernel", "float") and head["reason"]
