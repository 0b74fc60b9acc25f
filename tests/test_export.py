"""`semisparse export` / `semisparse.load`: pack/unpack against a straightforward reference, logits of the packed
and hf exports against the run directory's (Llama, GPT-2 Conv1D, SLoRB), sizes on disk against the byte formula,
RTN quantization against an independent float64 reference, bad input (exit 2, one line, nothing written), the
pipeline's export stage and the report's size rows."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import semisparse
from clirun import folder_state, one_line_error, run_subprocess
from semisparse import api
from semisparse.errors import UserError
from semisparse.export.pack import pack_bits, pack_layer, unpack_bits, unpack_layer
from semisparse.export.quant import dequantize, quantize
from semisparse.layers import weight_matrix
from semisparse.masks import Pattern, is_nm, nm_mask
from semisparse.models import load_model, save_run_dir
from tiny import magnitude_run, make_gpt2, make_llama, make_tokenizer, save_model_dir
from tiny import slorb_run as make_slorb_run

PATTERNS = [(1, 2), (1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (1, 3), (2, 6), (3, 5)]
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
IDS = torch.tensor([[5, 17, 42, 99, 150, 3, 77, 201, 8, 64, 120, 33]])


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


# ---------------------------------------------------------------------------------------- run directories


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tiny_dir):
    return magnitude_run(tiny_dir, tmp_path_factory.mktemp("runs") / "llama-2of4")


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return magnitude_run(save_model_dir(make_gpt2(), make_tokenizer(), root / "gpt2"), root / "gpt2-2of4")


@pytest.fixture(scope="module")
def slorb_run(tmp_path_factory, tiny_dir, text):
    out = make_slorb_run(tiny_dir, text, tmp_path_factory.mktemp("runs") / "boosted")
    assert (out / "slorb.safetensors").is_file()
    return out


@pytest.fixture(scope="module")
def kept_zero_run(tmp_path_factory, llama_run):
    """The Llama run with some *kept* weights set to exactly 0.0 (one whole row of a layer among them)."""
    loaded = load_model(str(llama_run))
    masks = load_file(str(llama_run / "masks.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    w = weight_matrix(loaded.model.get_submodule(name))
    w[0].zero_()  # a whole row, kept positions included
    kept = w[masks[name]]
    kept[::3] = 0.0
    w[masks[name]] = kept
    meta = json.loads((llama_run / "semisparse.json").read_text())
    return save_run_dir(tmp_path_factory.mktemp("runs") / "kept-zero", loaded.model, loaded.tokenizer, masks, meta)


def run_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """{sparse layer: W ⊙ M [out, in]} of a run directory, via the stock model and layers.weight_matrix."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir, dtype=torch.float32)  # stock: no SLoRB wrapper
    masks = load_file(str(run_dir / "masks.safetensors"))
    return {name: weight_matrix(model.get_submodule(name)).clone() * masks[name] for name in masks}


# ------------------------------------------------------------------------ pack / unpack: straightforward reference


def reference_pack(weight: torch.Tensor, mask: torch.Tensor, m: int) -> tuple[list[float], bytes]:
    """Kept values row by row and the positions as one little-endian bit string, with plain Python loops."""
    bits = max(1, math.ceil(math.log2(m)))
    values, codes = [], []
    for i in range(weight.shape[0]):
        for j in range(weight.shape[1]):
            if mask[i, j]:
                values.append(weight[i, j].item())
                codes.append(j % m)
    stream = sum(code << (k * bits) for k, code in enumerate(codes))
    return values, stream.to_bytes(math.ceil(len(codes) * bits / 8), "little")


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 5),
    groups=st.integers(1, 5),
    nm=st.sampled_from(PATTERNS),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    zero_frac=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_pack_unpack_round_trip_matches_reference(rows, groups, nm, dtype, zero_frac, seed):
    n, m = nm
    gen = torch.Generator().manual_seed(seed)
    mask = nm_mask(torch.rand(rows, groups * m, generator=gen), Pattern(n, m))
    weight = torch.randn(rows, groups * m, generator=gen).to(dtype)
    weight[torch.rand(rows, groups * m, generator=gen) < zero_frac] = 0.0  # kept values that are exactly 0
    weight = weight * mask
    packed = pack_layer(weight, mask, Pattern(n, m))
    ref_values, ref_positions = reference_pack(weight, mask, m)
    assert packed.values.shape == (rows, groups * n) and packed.values.dtype == dtype
    assert packed.values.reshape(-1).tolist() == ref_values
    assert bytes(packed.positions.tolist()) == ref_positions
    dense, got_mask = unpack_layer(packed.values, packed.positions, Pattern(n, m), (rows, groups * m))
    assert torch.equal(got_mask, mask)  # positions come from the mask, not from the non-zeros
    assert torch.equal(dense, weight)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), codes=st.lists(st.integers(0, 255), max_size=50))
def test_bit_packing_round_trip(bits, codes):
    codes = torch.tensor([c % (1 << bits) for c in codes], dtype=torch.int64)
    packed = pack_bits(codes, bits)
    assert packed.numel() == math.ceil(codes.numel() * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, codes.numel()), codes)


def test_corrupt_positions_are_refused():
    mask = nm_mask(torch.rand(2, 8), "2:4")
    packed = pack_layer(torch.randn(2, 8) * mask, mask, "2:4")
    bad = pack_bits(torch.tensor([1, 1] * 4), 2)  # a group whose two positions are equal
    with pytest.raises(ValueError, match="ascending"):
        unpack_layer(packed.values, bad, "2:4", (2, 8))


# ------------------------------------------------------------------------ quantization: float64 reference


def reference_rtn(values: torch.Tensor, bits: int, group: int, scale_dtype: torch.dtype):
    """(codes, scales, float64 de-quantized) of symmetric RTN, written from the definition in float64."""
    qmax = 2 ** (bits - 1) - 1
    v = values.double().reshape(values.shape[0], -1, group)
    amax = v.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).to(scale_dtype).double()
    q = torch.clamp(torch.round(v / scale), -qmax, qmax)
    return q.reshape(values.shape), scale, (q * scale).reshape(values.shape)


@pytest.mark.parametrize("scheme,bits,group", [("int8", 8, None), ("int4", 4, 32), ("int4", 4, 8)])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rtn_against_float64_reference(scheme, bits, group, scale_dtype):
    gen = torch.Generator().manual_seed(bits * 100 + (group or 0))
    values = torch.randn(6, 64, generator=gen) * torch.logspace(-3, 1, 6)[:, None]
    values[1] = 0.0  # an all-zero row
    values[2, ::5] = 0.0  # kept weights that are 0
    res = quantize(values, scheme, group, scale_dtype)
    g = res.group_size
    assert g == (64 if scheme == "int8" else group)
    deq = dequantize(res.codes, res.scales, scheme, g, tuple(values.shape)).double()
    q_ref, scale_ref, deq_ref = reference_rtn(values, bits, g, scale_dtype)
    step = scale_ref.expand(-1, -1, g).reshape(values.shape)
    # error at most half a step per element (with the stored scale), and zeros stay exactly zero
    assert bool(((deq - values.double()).abs() <= step / 2 * (1 + 1e-6)).all())
    assert bool((deq[values == 0] == 0).all())
    # the same codes as the reference except where v/s sits on a rounding tie (fp32 vs float64 division)
    q_got = torch.round(deq / step)
    frac = (values.double() / step).abs() % 1
    differ = q_got != q_ref
    assert bool(((frac[differ] - 0.5).abs() < 1e-4).all()) and int(differ.sum()) <= 2
    # where the codes agree, q · s differs from float64 only by the float32 rounding of the product
    assert torch.allclose(deq[~differ], deq_ref[~differ], rtol=2.0**-23, atol=0)
    assert res.scales.dtype == scale_dtype
    assert res.codes.dtype == (torch.int8 if scheme == "int8" else torch.uint8)
    assert res.codes.numel() == (values.numel() if scheme == "int8" else values.numel() // 2)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_export_keeps_the_nm_pattern(tmp_path, llama_run, quant):
    out = tmp_path / quant
    manifest = api.export(llama_run, out, dtype="fp32", quant=quant)
    masks = load_file(str(llama_run / "masks.safetensors"))
    tensors = load_file(str(out / "model.packed.safetensors"))
    model = semisparse.load(out)
    exact = run_weights(llama_run)
    for name, mask in masks.items():
        record = manifest["layers"][name]
        # the positions in the file are the run's mask, whatever the kept values quantized to
        _, unpacked = unpack_layer(torch.zeros(record["shape"][0], record["width"]),
                                   tensors[f"{name}.weight.positions"], "2:4", tuple(record["shape"]))
        assert torch.equal(unpacked, mask) and is_nm(unpacked, "2:4")
        w = weight_matrix(model.get_submodule(name))
        assert not bool(w[~mask].any())  # nothing outside the mask
        # de-quantized = the reference RTN of the kept values (float64, independently written above)
        group = max(g for g in (128, 64, 32) if record["width"] % g == 0) if quant == "int4" else record["width"]
        assert record["group_size"] == group  # int8: one group per output row
        _, _, deq_ref = reference_rtn(exact[name][mask].reshape(mask.shape[0], -1), 8 if quant == "int8" else 4,
                                      group, torch.float32)
        assert torch.allclose(w[mask].double(), deq_ref.reshape(-1), rtol=0, atol=1e-6)
    assert manifest["quantization"]["scheme"] == quant and manifest["quantization"]["method"] == "rtn"


# ------------------------------------------------------------------------ packed export: exact model


@pytest.mark.parametrize("which", ["llama", "gpt2", "kept_zero"])
def test_packed_fp32_is_exactly_the_run_directory(tmp_path, which, request, cli):
    run_dir = request.getfixturevalue({"llama": "llama_run", "gpt2": "gpt2_run", "kept_zero": "kept_zero_run"}[which])
    out = tmp_path / "packed"
    r = cli("export", run_dir, "--out", out, "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    assert "17.000 bits per weight" in " ".join(r.stdout.split())  # fp32 values + 2-bit positions, per 2 weights
    model = semisparse.load(out)
    reference = load_model(str(run_dir)).model
    for name, w in run_weights(run_dir).items():
        assert torch.equal(weight_matrix(model.get_submodule(name)), w), name
    assert torch.equal(logits(model), logits(reference))
    # tied embeddings stay tied, and the file stores them once
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert "lm_head.weight" not in load_file(str(out / "model.packed.safetensors"))
    # generate works on the rebuilt model and agrees with the run directory's
    gen = model.generate(IDS[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, reference.generate(IDS[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=0))


def test_kept_zeros_keep_their_positions(tmp_path, kept_zero_run):
    out = tmp_path / "packed"
    api.export(kept_zero_run, out, dtype="fp16")
    tensors = load_file(str(out / "model.packed.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    mask = load_file(str(kept_zero_run / "masks.safetensors"))[name]
    values = tensors[f"{name}.weight.values"]
    assert bool((values[0] == 0).all())  # the zeroed row is stored ...
    _, unpacked = unpack_layer(values, tensors[f"{name}.weight.positions"], "2:4", tuple(mask.shape))
    assert torch.equal(unpacked, mask)  # ... at the mask's positions, not at "the non-zeros"


@pytest.mark.parametrize("dtype,rtol", [("fp16", 2e-3), ("bf16", 2e-2)])  # measured: 4e-4 and 3.5e-3
@pytest.mark.parametrize("run", ["llama_run", "gpt2_run"])
def test_packed_half_precision_logits(tmp_path, request, run, dtype, rtol):
    """Stated tolerance: loaded in fp32, the export is exactly the run dir with every floating tensor rounded to
    the export dtype; computed natively in that dtype the logits are within rtol · max|logit| of fp32."""
    run_dir = request.getfixturevalue(run)
    out = tmp_path / dtype
    api.export(run_dir, out, dtype=dtype)
    reference = load_model(str(run_dir)).model
    rounded = load_model(str(run_dir)).model
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(TORCH_DTYPES[dtype]).float())
    assert torch.equal(logits(semisparse.load(out, dtype=torch.float32)), logits(rounded))
    native = semisparse.load(out)
    assert native.dtype == TORCH_DTYPES[dtype]
    ref = logits(reference)
    assert float((logits(native) - ref).abs().max()) <= rtol * float(ref.abs().max())


def test_slorb_run_packed_and_hf(tmp_path, slorb_run, cli):
    reference = load_model(str(slorb_run)).model  # SLoRB re-attached by load_model
    ref = logits(reference)

    # packed keeps the branch: exact at fp32
    out = tmp_path / "packed"
    manifest = api.export(slorb_run, out, dtype="fp32")
    model = semisparse.load(out)
    assert manifest["slorb"] == {"layers": 14, "merged": False} and manifest["nm"] is True
    assert torch.equal(logits(model), ref)
    from semisparse.train.sparse_linear import sparse_layers

    assert len([layer for layer in sparse_layers(model).values() if layer.has_slorb]) == 14

    # hf refuses to drop the branch silently ...
    r = cli("export", slorb_run, "--out", tmp_path / "hf", "--format", "hf")
    assert "--merge-slorb" in one_line_error(r) and not (tmp_path / "hf").exists()
    # ... and merges it when asked: W' = W⊙M + S·X, checked in float64
    r = cli("export", slorb_run, "--out", tmp_path / "hf", "--format", "hf", "--dtype", "fp32", "--merge-slorb")
    assert r.returncode == 0, r.stderr
    assert "no longer 2:4" in " ".join(r.stdout.split())
    manifest = json.loads((tmp_path / "hf" / "export.json").read_text())
    assert manifest["nm"] is False and manifest["slorb"]["merged"] is True
    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    slorb = load_file(str(slorb_run / "slorb.safetensors"))
    masks = load_file(str(slorb_run / "masks.safetensors"))
    dense = run_weights(slorb_run)
    for name in masks:
        expected = dense[name].double() + slorb[f"{name}.slorb_S"].double() @ slorb[f"{name}.slorb_X"].double()
        got = weight_matrix(stock.get_submodule(name)).double()
        assert torch.allclose(got, expected, rtol=0, atol=1e-6), name
        assert not is_nm(got != 0, "2:4")
    assert torch.allclose(logits(stock), ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("run", ["llama_run", "gpt2_run"])
def test_hf_export_loads_in_stock_transformers(tmp_path, request, run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = request.getfixturevalue(run)
    api.export(run_dir, tmp_path / "hf32", format="hf", dtype="fp32")
    api.export(run_dir, tmp_path / "hf16", format="hf", dtype="fp16")
    ref = logits(load_model(str(run_dir)).model)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "hf32").eval()
    assert torch.equal(logits(stock), ref)
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "hf16", dtype=torch.float32).eval()
    assert float((logits(half) - ref).abs().max()) <= 2e-3 * float(ref.abs().max())
    assert AutoTokenizer.from_pretrained(tmp_path / "hf32")("fox").input_ids
    assert torch.equal(logits(semisparse.load(tmp_path / "hf32")), ref)


# ------------------------------------------------------------------------ sizes on disk


def safetensors_layout(path: Path) -> tuple[dict, int]:
    """(header, data bytes) read by hand: an 8-byte little-endian header length, the JSON header, the data."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    return header, len(raw) - 8 - n


@pytest.mark.parametrize("quant,group", [("none", None), ("int8", None), ("int4", None), ("int4", 32)])
@pytest.mark.parametrize("run", ["llama_run", "gpt2_run"])
def test_sizes_on_disk_match_the_formula(tmp_path, request, run, quant, group):
    run_dir = request.getfixturevalue(run)
    out = tmp_path / "packed"
    api.export(run_dir, out, dtype="fp16", quant=quant, group_size=group)
    masks = load_file(str(run_dir / "masks.safetensors"))
    source, _ = safetensors_layout(run_dir / "model.safetensors")
    layer_shapes = {name: tuple(m.shape) for name, m in masks.items()}
    dense_entries = sum(math.prod(t["shape"]) for key, t in source.items()
                        if key.removesuffix(".weight") not in masks or not key.endswith(".weight"))
    sparse_bytes = 0
    for out_f, in_f in layer_shapes.values():
        kept = out_f * in_f // 2
        if quant == "none":
            values = 2 * kept
        elif quant == "int8":
            values = kept + 2 * out_f  # int8 codes + one fp16 scale per output row
        else:
            g = group or max(g for g in (128, 64, 32) if (in_f // 2) % g == 0)
            values = math.ceil(kept / 2) + 2 * out_f * (in_f // 2) // g  # two codes a byte + fp16 group scales
        sparse_bytes += values + math.ceil(kept * 2 / 8)  # 2-bit positions
    _, data_bytes = safetensors_layout(out / "model.packed.safetensors")
    assert data_bytes == sparse_bytes + 2 * dense_entries
    dense_fp16 = 2 * sum(o * i for o, i in layer_shapes.values())
    assert sparse_bytes <= 0.5625 * dense_fp16
    if quant == "none":
        assert sparse_bytes == 0.5625 * dense_fp16  # 9 bits a weight, exactly
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["sizes"]["sparse_layers"]["bytes"] == sparse_bytes
    assert manifest["sizes"]["tensor_bytes"] == data_bytes


# ------------------------------------------------------------------------ bad input: exit 2, one line, nothing written


def test_bad_inputs_are_one_line_and_write_nothing(tmp_path, tiny_dir, llama_run, cli):
    out = tmp_path / "out"
    cases = [
        (["export", tiny_dir, "--out", out], "dense model"),
        (["export", tmp_path / "nope", "--out", out], "does not exist"),
        (["export", llama_run, "--out", out, "--format", "zip"], "--format"),
        (["export", llama_run, "--out", out, "--dtype", "fp8"], "--dtype"),
        (["export", llama_run, "--out", out, "--quant", "int4", "--format", "hf"], "--format packed"),
        (["export", llama_run, "--out", out, "--merge-slorb"], "--format hf"),
        (["export", llama_run, "--out", out, "--group-size", "32"], "int4"),
        (["export", llama_run, "--out", out, "--quant", "int4", "--group-size", "48"],
         "model.layers.0.mlp.down_proj"),
        (["export", llama_run, "--out", llama_run / "inside"], "inside"),
        (["export", llama_run, "--out", llama_run, "--overwrite"], "replace the run directory"),
    ]
    before = folder_state(llama_run)
    for args, needle in cases:
        line = one_line_error(cli(*args))
        assert needle in line, (args, line)
        assert not out.exists()
    assert folder_state(llama_run) == before


def test_a_non_zero_where_the_mask_prunes_is_refused(tmp_path, llama_run, cli):
    """Packing keeps only the mask's positions, so a run directory whose weights are not W ⊙ M would be changed
    silently: it is refused instead."""
    loaded = load_model(str(llama_run))
    masks = load_file(str(llama_run / "masks.safetensors"))
    name = "model.layers.1.mlp.up_proj"
    w = weight_matrix(loaded.model.get_submodule(name))
    w[~masks[name]] = 0.5
    meta = json.loads((llama_run / "semisparse.json").read_text())
    bad = save_run_dir(tmp_path / "bad", loaded.model, loaded.tokenizer, masks, meta)
    # a real process: its exit code, and no transformers progress bar around the line
    line = one_line_error(run_subprocess("export", bad, "--out", tmp_path / "out"))
    assert name in line and "prunes" in line and not (tmp_path / "out").exists()


def test_no_default_group_size_names_the_layer(tmp_path, cli):
    model_dir = save_model_dir(make_llama(hidden=48), make_tokenizer(), tmp_path / "odd")
    run_dir = magnitude_run(model_dir, tmp_path / "odd-run")
    line = one_line_error(cli("export", run_dir, "--out", tmp_path / "out", "--quant", "int4"))
    assert "layer model.layers.0." in line and "--group-size" in line
    assert not (tmp_path / "out").exists()
    assert cli("export", run_dir, "--out", tmp_path / "out", "--quant", "int4", "--group-size", "8").returncode == 0


def test_existing_output_needs_overwrite(tmp_path, llama_run, cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "--overwrite" in one_line_error(cli("export", llama_run, "--out", out))
    assert folder_state(out) == {"keep.txt": b"mine"}
    assert cli("export", llama_run, "--out", out, "--overwrite").returncode == 0
    assert not (out / "keep.txt").exists() and (out / "export.json").is_file()


def test_a_failed_write_leaves_nothing(tmp_path, llama_run, monkeypatch):
    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(UserError, match="No space left"):
        api.export(llama_run, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no output, no staging leftovers


@pytest.mark.parametrize("damage", ["truncate", "flip", "future", "missing"])
def test_damaged_exports_are_refused(tmp_path, llama_run, text, cli, damage):
    out = tmp_path / "packed"
    api.export(llama_run, out)
    weights = out / "model.packed.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "flip":
        raw = bytearray(weights.read_bytes())
        raw[-5] ^= 0x01  # same size, one bit of a tensor
        weights.write_bytes(bytes(raw))
    elif damage == "future":
        manifest = json.loads((out / "export.json").read_text())
        manifest["format_version"] = 99
        (out / "export.json").write_text(json.dumps(manifest))
    else:
        (out / "tokenizer.json").unlink()
    needle = {"truncate": "sha256", "flip": "sha256", "future": "upgrade semisparse", "missing": "missing"}[damage]
    line = one_line_error(cli("eval", out, "--ppl", text, "--ppl-seqlen", 32, "--device", "cpu"))
    assert needle in line and not (out / "eval.json").exists()
    with pytest.raises(UserError, match=needle):
        semisparse.load(out)
    if damage == "future":  # the report reads the manifest too (it hashes nothing: it only reads sizes)
        assert needle in one_line_error(cli("report", out, "--out", tmp_path / "rep"))


# ------------------------------------------------------------------------ eval, lm-eval, report on an exported folder


def test_eval_and_report_of_an_exported_folder(tmp_path, llama_run, text, cli):
    out32, out4 = tmp_path / "fp32", tmp_path / "int4"
    api.export(llama_run, out32, dtype="fp32")
    api.export(llama_run, out4, quant="int4")
    ppl = {}
    for spec in (llama_run, out32):
        r = cli("eval", spec, "--ppl", text, "--ppl-seqlen", 32, "--device", "cpu",
                "--out", tmp_path / f"{spec.name}.json")
        assert r.returncode == 0, r.stderr
        ppl[spec.name] = json.loads((tmp_path / f"{spec.name}.json").read_text())["perplexity"][str(text)]["ppl"]
    assert ppl["fp32"] == ppl[llama_run.name]  # the same model, bit for bit

    r = cli("report", llama_run, out4, "--out", tmp_path / "rep")
    assert r.returncode == 0, r.stderr
    report = (tmp_path / "rep" / "report.md").read_text()
    row = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
           for line in report.splitlines() if line.startswith("| ")}
    assert row["export format"] == ["—", "packed fp16, int4 rtn"]
    on_disk = sum(p.stat().st_size for p in out4.iterdir())
    assert row["exported folder on disk"][1].endswith(f"({on_disk:,} B)")
    manifest = json.loads((out4 / "export.json").read_text())
    sparse = manifest["sizes"]["sparse_layers"]
    assert row["bits per sparse-layer weight (packed)"][1] == f"{8 * sparse['bytes'] / sparse['weights']:.3f}"
    packed_bytes = (out4 / "model.packed.safetensors").stat().st_size
    params = sparse["weights"] + manifest["sizes"]["dense_tensors"]["entries"]
    assert row["bits per weight (weight file)"][1] == f"{8 * packed_bytes / params:.3f}"
    assert row["total parameters (model.safetensors)"][0] == row["total parameters (model.safetensors)"][1]


def test_lm_eval_scores_the_loaded_export(tmp_path, llama_run, fixture_data):
    from semisparse.evaluate.zeroshot import run_zeroshot

    api.export(llama_run, tmp_path / "fp32", dtype="fp32")
    loaded = load_model(str(tmp_path / "fp32"))
    reference = load_model(str(llama_run))
    got = run_zeroshot(loaded.model, loaded.tokenizer, ["copa"], task_data=fixture_data, limit=2, batch_size=1,
                       log_samples=True, bootstrap_iters=0)
    want = run_zeroshot(reference.model, reference.tokenizer, ["copa"], task_data=fixture_data, limit=2,
                        batch_size=1, log_samples=True, bootstrap_iters=0)
    assert [s["loglikelihoods"] for s in got["samples"]["copa"]] == \
        [s["loglikelihoods"] for s in want["samples"]["copa"]]


# ------------------------------------------------------------------------ the pipeline's export stage


def pipeline_flags(text: Path) -> list:
    """A pipeline sized for a tiny model (as in test_pipeline.py): magnitude prune, 2 AST steps of 2 x 16 tokens."""
    return ["--method", "magnitude", "--data", text, "--tokens", 2 * 2 * 16, "--ppl", text,
            "--set", "eval.ppl_seqlen=32", "--set", "recipe.train.seq_len=16", "--set", "recipe.train.batch_size=2",
            "--set", "recipe.eval.windows=1", "--set", "recipe.checkpoint.every=0", "--no-progress"]


def test_pipeline_export_stage(tmp_path, tiny_dir, text, cli):
    out = tmp_path / "out"
    r = cli("run", tiny_dir, "--out", out, *pipeline_flags(text), "--stages", "prune,train", "--export", "packed")
    assert r.returncode == 0, r.stderr
    assert "export: running" in r.stdout
    manifest = json.loads((out / "export" / "export.json").read_text())
    assert manifest["source"]["run_dir"] == str((out / "train").resolve()) and manifest["options"]["dtype"] == "fp16"
    model = semisparse.load(out / "export", dtype=torch.float32)
    for name, w in run_weights(out / "train").items():
        assert torch.equal(weight_matrix(model.get_submodule(name)), w.half().float()), name
    stamps = {p: p.stat().st_mtime_ns for p in (out / "export").rglob("*")}
    again = cli("run", tiny_dir, "--out", out, *pipeline_flags(text), "--stages", "prune,train", "--export", "packed")
    assert again.returncode == 0, again.stderr
    assert "export: complete, skipped" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in (out / "export").rglob("*")} == stamps
    # changed export settings redo only the export
    r = cli("run", tiny_dir, "--out", out, *pipeline_flags(text), "--stages", "prune,train", "--export", "packed",
            "--set", "export.quant=int8")
    assert r.returncode == 0, r.stderr
    assert "train: complete, skipped" in r.stdout and "export: running" in r.stdout
    assert json.loads((out / "export" / "export.json").read_text())["quantization"]["scheme"] == "int8"


def test_export_added_to_a_finished_pipeline_exports_the_prune_stage(tmp_path, tiny_dir, text, cli):
    out = tmp_path / "out"
    assert cli("run", tiny_dir, "--out", out, *pipeline_flags(text), "--stages", "prune").returncode == 0
    r = cli("run", tiny_dir, "--out", out, *pipeline_flags(text), "--stages", "prune", "--export", "hf")
    assert r.returncode == 0, r.stderr
    assert "prune: complete, skipped" in r.stdout and "export: running" in r.stdout
    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(out / "export", dtype=torch.float32).eval()
    assert torch.allclose(logits(stock), logits(load_model(str(out / "prune")).model), rtol=0, atol=1e-2)


def test_pipeline_export_config_errors(tmp_path, tiny_dir, text, cli):
    line = one_line_error(cli("run", tiny_dir, "--out", tmp_path / "o", *pipeline_flags(text), "--stages", "eval",
                              "--export", "packed"))
    assert "export" in line and "train" in line
    line = one_line_error(cli("run", tiny_dir, "--out", tmp_path / "o", *pipeline_flags(text), "--stages", "prune",
                              "--export", "zip"))
    assert "export.format" in line
    line = one_line_error(cli("run", tiny_dir, "--out", tmp_path / "o", *pipeline_flags(text), "--stages", "prune",
                              "--export", "hf", "--set", "export.quant=int4"))
    assert "--format packed" in line
    line = one_line_error(cli("run", tiny_dir, "--out", tmp_path / "o", *pipeline_flags(text), "--stages", "prune",
                              "--export", "packed", "--set", "export.quant_method=gptq"))
    assert "--quant-method gptq needs --quant int8 or int4" in line
    assert not (tmp_path / "o").exists()


def test_pipeline_gptq_export_records_and_skips(tmp_path, tiny_dir, text, cli):
    out = tmp_path / "out"
    flags = [*pipeline_flags(text), "--stages", "prune", "--export", "packed", "--set", "export.quant=int8",
             "--set", "export.quant_method=gptq", "--set", f"export.calib={text}", "--set", "export.nsamples=4",
             "--set", "export.seqlen=16"]
    r = cli("run", tiny_dir, "--out", out, *flags)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "export" / "export.json").read_text())
    assert manifest["quantization"]["method"] == "gptq" and manifest["options"]["nsamples"] == 4
    again = cli("run", tiny_dir, "--out", out, *flags)
    assert again.returncode == 0 and "export: complete, skipped" in again.stdout


def test_export_is_not_a_default_stage():
    from semisparse.pipeline import PipelineConfig

    assert "export" not in PipelineConfig(out="x").stages


def test_package_import_stays_light():
    import subprocess
    import sys

    code = "import sys, semisparse; assert callable(semisparse.load); print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr
