"""`semisparse export --format gguf`: the file read back with gguf's own reader and de-quantizers, q/k rows put back
in transformers' order by an inverse written here, against the run directory's weights (exact at fp16/bf16/fp32,
within a bound derived below for Q8_0 and Q4_0, the 2:4 zeros exactly zero); metadata against config.json; the
tokenizer against the run's tokenizer files; transformers' GGUF loader; bad input (exit 2, one line, nothing
written); and the shipped SmolLM2 (marked realmodel)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from clirun import folder_state, one_line_error
from semisparse import api
from semisparse.errors import UserError
from tiny import magnitude_run, make_gpt2, make_llama, make_tokenizer, save_model_dir
from tiny import slorb_run as make_slorb_run

Q = gguf.GGMLQuantizationType
FLOAT_TYPES = {"fp16": (Q.F16, torch.float16), "bf16": (Q.BF16, torch.bfloat16), "fp32": (Q.F32, torch.float32)}
CHAT_TEMPLATE = "{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
# llama.cpp's tensor names (its llama loader), written out here rather than taken from the gguf package's map.
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


# ---------------------------------------------------------------------------------------- run directories


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """The tiny Llama (tied embeddings), its tokenizer with a chat template, pruned 2:4."""
    root = tmp_path_factory.mktemp("runs")
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return magnitude_run(save_model_dir(make_llama(), tokenizer, root / "tiny"), root / "llama-2of4")


@pytest.fixture(scope="module")
def variant_run(tmp_path_factory):
    """Untied LM head, head size 32 (not hidden / heads = 16), rope base 5e5, 16 embedding rows without a token."""
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                      tie_word_embeddings=False, rope_theta=5e5, rms_norm_eps=1e-5)
    root = tmp_path_factory.mktemp("runs")
    return magnitude_run(save_model_dir(LlamaForCausalLM(cfg).eval(), make_tokenizer(), root / "variant"), root / "v-2of4")


@pytest.fixture(scope="module")
def slorb_run(tmp_path_factory, tiny_dir, text):
    out = make_slorb_run(tiny_dir, text, tmp_path_factory.mktemp("runs") / "boosted")
    return out


def run_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """The run directory's stock state dict (float32), read from its safetensors file."""
    return load_file(str(run_dir / "model.safetensors"))


def config_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "config.json").read_text())


# ---------------------------------------------------------------------------------------- reading the file back


def read_gguf(path: Path) -> tuple[dict, dict]:
    """({key: value}, {tensor name: (type, float64 values [rows, row length] or [n])}) via gguf's reader and
    de-quantizers."""
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        rows = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the row length first
        tensors[t.name] = (t.tensor_type, torch.from_numpy(np.array(values, dtype=np.float64)).reshape(rows))
    return fields, tensors


def rotary_to_hf(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order back to transformers': within a head of d rows, GGUF row 2i + j (j = 0, 1) is
    transformers' row j·d/2 + i (the same inverse transformers' GGUF loader applies)."""
    d = weight.shape[0] // heads
    return weight.reshape(heads, d // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def expected_names(cfg: dict) -> dict[str, str]:
    """state-dict key -> llama.cpp tensor name, for what the file must hold."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not cfg["tie_word_embeddings"]:
        names["lm_head.weight"] = "output.weight"
    for i in range(cfg["num_hidden_layers"]):
        for hf, ours in LAYER_NAMES.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{ours}.weight"
    return names


def as_hf(tensors: dict, cfg: dict) -> dict[str, tuple]:
    """{state-dict key: (GGUF type, float64 values in transformers' layout)}; the file's tensors are exactly these."""
    names = expected_names(cfg)
    assert set(tensors) == set(names.values())
    out = {}
    for key, name in names.items():
        qtype, values = tensors[name]
        if ".q_proj." in key:
            values = rotary_to_hf(values, cfg["num_attention_heads"])
        elif ".k_proj." in key:
            values = rotary_to_hf(values, cfg["num_key_value_heads"])
        out[key] = (qtype, values)
    return out


def block_error_bound(ref: torch.Tensor, qtype) -> torch.Tensor:
    """Per element, the largest |de-quantized − original| the block format allows (blocks of 32 along a row).

    Both formats store a float16 scale d per block and integer codes; gguf computes the codes with the float32 d and
    de-quantizes with float16(d), whose relative error is at most 2^-11 (plus 2^-25 absolute below fp16's normal
    range), times the largest code.
      Q8_0: d = amax/127, code = round(x/d) in [−127, 127]: half a step, |err| <= d/2 + 127·Δd.
      Q4_0: d = −max/8 (max: the signed value of largest magnitude), code = trunc(x/d + 8.5) clipped to [0, 15],
            value (code − 8)·d: half a step, except where x/d >= 7.5 (the opposite sign of max, |x| >= 7.5/8·amax),
            clipped to 7: up to a whole step; |err| <= d/2 (or d) + 8·Δd.
    """
    blocks = ref.reshape(-1, 32)
    amax = blocks.abs().amax(dim=1, keepdim=True)
    top = 127 if qtype == Q.Q8_0 else 8
    step = amax / top
    scale_error = top * (step * 2.0**-11 + 2.0**-25)
    half = (step / 2).expand_as(blocks)
    if qtype == Q.Q4_0:
        signed_max = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))
        clipped = (blocks * signed_max < 0) & (blocks.abs() >= 7.5 / 8 * amax)
        half = torch.where(clipped, step, half)
    return (half + scale_error + 1e-7 * amax).reshape(ref.shape)  # 1e-7: float32 arithmetic on the way


def export(run_dir: Path, out: Path, **options) -> dict:
    return api.export(run_dir, out, format="gguf", **options)


# ---------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("which", ["llama_run", "variant_run"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_float_export_is_the_run_directory(tmp_path, request, which, dtype):
    run_dir = request.getfixturevalue(which)
    cfg, state = config_of(run_dir), run_state(run_dir)
    record = export(run_dir, tmp_path / "m.gguf", dtype=dtype)
    _, tensors = read_gguf(tmp_path / "m.gguf")
    gguf_type, torch_dtype = FLOAT_TYPES[dtype]
    for key, (qtype, values) in as_hf(tensors, cfg).items():
        ref = state[key]
        if ref.dim() == 1:
            assert qtype == Q.F32 and torch.equal(values, ref.double()), key
        else:
            assert qtype == gguf_type and torch.equal(values, ref.to(torch_dtype).double()), key
    assert record["nm"] is True and record["tied"] == cfg["tie_word_embeddings"]
    assert record["files"]["m.gguf"]["bytes"] == (tmp_path / "m.gguf").stat().st_size


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_block_quantized_export_within_its_bound_and_zeros_exact(tmp_path, llama_run, quant):
    cfg, state = config_of(llama_run), run_state(llama_run)
    masks = load_file(str(llama_run / "masks.safetensors"))
    export(llama_run, tmp_path / "m.gguf", quant=quant)
    _, tensors = read_gguf(tmp_path / "m.gguf")
    want_type = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[quant]
    checked = 0
    for key, (qtype, values) in as_hf(tensors, cfg).items():
        ref = state[key].double()
        if ref.dim() == 1:
            assert qtype == Q.F32 and torch.equal(values, ref), key
            continue
        # q4_0 keeps the (tied) embedding, which is also the LM head, at 8 bits
        assert qtype == (Q.Q8_0 if key == "model.embed_tokens.weight" else want_type), key
        err = (values - ref).abs()
        bound = block_error_bound(ref, qtype)
        assert bool((err <= bound).all()), (key, float((err - bound).max()))
        assert bool((values[ref == 0] == 0).all()), key  # every zero stays exactly zero
        layer = key.removesuffix(".weight")
        if layer in masks:
            assert bool((values[~masks[layer]] == 0).all()), key  # so the 2:4 pattern is in the file
            checked += 1
    assert checked == len(masks) == 14
    # the bound is not vacuous: the de-quantized weights do differ from the run directory's
    assert any(not torch.equal(v, state[k].double()) for k, (_, v) in as_hf(tensors, cfg).items())


def test_rows_that_are_no_whole_blocks_fall_back_to_the_float_type(tmp_path):
    torch.manual_seed(2)
    cfg = LlamaConfig(vocab_size=384, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    run = magnitude_run(save_model_dir(LlamaForCausalLM(cfg).eval(), make_tokenizer(), tmp_path / "m48"), tmp_path / "r")
    record = export(run, tmp_path / "m.gguf", quant="q8_0", dtype="bf16")
    _, tensors = read_gguf(tmp_path / "m.gguf")
    state = run_state(run)
    for key, (qtype, values) in as_hf(tensors, config_of(run)).items():
        ref = state[key]
        if ref.dim() == 2 and ref.shape[1] % 32:  # rows of 48: bf16, exactly
            assert qtype == Q.BF16 and torch.equal(values, ref.to(torch.bfloat16).double()), key
        elif ref.dim() == 2:  # down_proj's rows of 96 are three blocks
            assert qtype == Q.Q8_0 and bool((values - ref.double()).abs().le(block_error_bound(ref.double(),
                                                                                     qtype)).all()), key
    assert record["tensors"]["blk.0.ffn_down.weight"] == "Q8_0" and record["tensors"]["blk.0.attn_q.weight"] == "BF16"


def test_slorb_is_merged_only_when_asked(tmp_path, slorb_run, cli):
    line = one_line_error(cli("export", slorb_run, "--out", tmp_path / "m.gguf", "--format", "gguf"))
    assert "--merge-slorb" in line and "GGUF" in line and "SLoRB" in line
    assert not any(tmp_path.iterdir())
    r = cli("export", slorb_run, "--out", tmp_path / "m.gguf", "--format", "gguf", "--dtype", "fp32",
            "--merge-slorb")
    assert r.returncode == 0, r.stderr
    assert "no longer 2:4" in r.stdout
    record = json.loads(gguf.GGUFReader(str(tmp_path / "m.gguf")).fields["semisparse.export"].contents())
    assert record["nm"] is False and record["slorb"] == {"layers": 14, "merged": True}
    _, tensors = read_gguf(tmp_path / "m.gguf")
    merged = as_hf(tensors, config_of(slorb_run))
    slorb, masks, state = load_file(str(slorb_run / "slorb.safetensors")), \
        load_file(str(slorb_run / "masks.safetensors")), run_state(slorb_run)
    for layer in masks:
        want = state[f"{layer}.weight"].double() * masks[layer] \
            + slorb[f"{layer}.slorb_S"].double() @ slorb[f"{layer}.slorb_X"].double()
        assert torch.allclose(merged[f"{layer}.weight"][1], want, rtol=0, atol=1e-6), layer


# ---------------------------------------------------------------------------------------- metadata, tokenizer


@pytest.mark.parametrize("which", ["llama_run", "variant_run"])
def test_metadata_equals_the_config(tmp_path, request, which):
    run_dir = request.getfixturevalue(which)
    cfg = config_of(run_dir)
    export(run_dir, tmp_path / "m.gguf", quant="q8_0")
    fields, tensors = read_gguf(tmp_path / "m.gguf")
    head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta"))
    assert fields["general.architecture"] == "llama"
    assert fields["llama.context_length"] == cfg["max_position_embeddings"]
    assert fields["llama.embedding_length"] == cfg["hidden_size"]
    assert fields["llama.block_count"] == cfg["num_hidden_layers"]
    assert fields["llama.feed_forward_length"] == cfg["intermediate_size"]
    assert fields["llama.attention.head_count"] == cfg["num_attention_heads"]
    assert fields["llama.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert fields["llama.rope.dimension_count"] == head
    assert fields["llama.rope.freq_base"] == np.float32(theta)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == np.float32(cfg["rms_norm_eps"])
    assert fields["llama.vocab_size"] == cfg["vocab_size"] == len(fields["tokenizer.ggml.tokens"])
    assert fields["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    if head * cfg["num_attention_heads"] != cfg["hidden_size"]:
        assert fields["llama.attention.key_length"] == fields["llama.attention.value_length"] == head
    else:
        assert "llama.attention.key_length" not in fields
    assert ("output.weight" in tensors) is (not cfg["tie_word_embeddings"])
    record = json.loads(fields["semisparse.export"])
    assert record["pattern"] == "2:4" and record["options"]["quant"] == "q8_0"
    assert record["source"]["run_dir"] == str(run_dir.resolve())
    assert record["source"]["meta"] == json.loads((run_dir / "semisparse.json").read_text())


@pytest.mark.parametrize("which", ["llama_run", "variant_run"])
def test_tokenizer_is_the_run_directorys(tmp_path, request, which):
    run_dir = request.getfixturevalue(which)
    cfg = config_of(run_dir)
    spec = json.loads((run_dir / "tokenizer.json").read_text())
    vocab = {index: token for token, index in spec["model"]["vocab"].items()}
    special = {t["id"]: t["content"] for t in spec["added_tokens"] if t["special"]}
    vocab.update(special)
    export(run_dir, tmp_path / "m.gguf")
    fields, _ = read_gguf(tmp_path / "m.gguf")
    tokens = fields["tokenizer.ggml.tokens"]
    # llama.cpp's names (src/llama-vocab.cpp): the model "gpt2", GPT-2's pre-tokenizer "gpt-2" (with a hyphen)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert tokens[:len(vocab)] == [vocab[i] for i in range(len(vocab))]
    assert tokens[len(vocab):] == [f"[PAD{i}]" for i in range(len(vocab), cfg["vocab_size"])]
    want_types = [3 if i in special else 1 if i in vocab else 5 for i in range(cfg["vocab_size"])]
    assert fields["tokenizer.ggml.token_type"] == want_types
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m)
                                               for m in spec["model"]["merges"]]
    eot = {t["content"]: t["id"] for t in spec["added_tokens"]}["<|endoftext|>"]
    assert fields["tokenizer.ggml.bos_token_id"] == fields["tokenizer.ggml.eos_token_id"] == eot
    assert fields["tokenizer.ggml.add_bos_token"] is False
    if which == "llama_run":
        assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE
    else:
        assert "tokenizer.chat_template" not in fields
    # transformers' GGUF tokenizer, built from these keys, tokenizes like the run directory's tokenizer
    ours = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    theirs = AutoTokenizer.from_pretrained(run_dir)
    text = "The quick brown fox, 0123 jumps<|endoftext|> over  the lazy dog.\n"
    assert ours.encode(text) == theirs.encode(text) and len(theirs.encode(text)) > 10


# ---------------------------------------------------------------------------------------- other readers


def test_transformers_gguf_loader_reads_the_exported_weights(tmp_path, llama_run, monkeypatch):
    """transformers' GGUF loader (its own de-quantizers and q/k inverse) gives the file's weights exactly, and the
    fp16 file, loaded as a MODEL through semisparse (`semisparse eval FILE.gguf`), the run directory's logits."""
    from semisparse.models import load_model

    cfg = config_of(llama_run)
    for quant in ("q8_0", "q4_0"):
        export(llama_run, tmp_path / f"{quant}.gguf", quant=quant)
        _, tensors = read_gguf(tmp_path / f"{quant}.gguf")
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"{quant}.gguf", dtype=torch.float32)
        state = theirs.state_dict()
        for key, (_, values) in as_hf(tensors, cfg).items():
            assert torch.equal(state[key].double(), values), (quant, key)
    monkeypatch.setenv("SEMISPARSE_CACHE", str(tmp_path / "cache"))
    export(llama_run, tmp_path / "f16.gguf")
    ids = torch.tensor([[5, 17, 42, 99, 150, 3, 77, 201, 8, 64, 120, 33]])
    with torch.no_grad():
        got = load_model(str(tmp_path / "f16.gguf")).model(ids).logits
        want = load_model(str(llama_run)).model(ids).logits
    assert torch.allclose(got, want, rtol=0, atol=2e-3), float((got - want).abs().max())


# ---------------------------------------------------------------------------------------- bad input


def test_bad_inputs_are_one_line_and_write_nothing(tmp_path, llama_run, cli):
    gpt2_run = magnitude_run(save_model_dir(make_gpt2(), make_tokenizer(), tmp_path / "gpt2"), tmp_path / "gpt2-run")
    work = tmp_path / "work"
    work.mkdir()
    (work / "a-file").write_text("x")
    out = work / "m.gguf"
    gg = ["--format", "gguf"]
    cases = [
        (["export", gpt2_run, "--out", out, *gg], "'gpt2'"),
        (["export", llama_run, "--out", out, *gg, "--quant", "int8"], "--format gguf takes"),
        (["export", llama_run, "--out", out, "--quant", "q4_0"], "needs --format gguf"),
        (["export", llama_run, "--out", out, *gg, "--group-size", "32"], "int4"),
        (["export", llama_run, "--out", work / "m.bin", *gg], ".gguf"),
        (["export", llama_run, "--out", work / "folder.gguf", *gg], "is a folder"),
        (["export", llama_run, "--out", llama_run / "m.gguf", *gg], "inside the run directory"),
        (["export", llama_run, "--out", work / "a-file" / "m.gguf", *gg], "cannot write"),
    ]
    (work / "folder.gguf").mkdir()
    before, run_before = folder_state(work), folder_state(llama_run)
    for args, needle in cases:
        line = one_line_error(cli(*args))
        assert needle in line, (args, line)
        assert folder_state(work) == before and sorted(p.name for p in work.iterdir()) == ["a-file", "folder.gguf"]
    assert folder_state(llama_run) == run_before
    with pytest.raises(UserError, match="llama-architecture"):
        export(gpt2_run, out)


def test_existing_output_needs_overwrite(tmp_path, llama_run, cli):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"an older file")
    line = one_line_error(cli("export", llama_run, "--out", out, "--format", "gguf", "--quant", "q8_0"))
    assert "exists" in line and "--overwrite" in line and out.read_bytes() == b"an older file"
    r = cli("export", llama_run, "--out", out, "--format", "gguf", "--quant", "q8_0", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert gguf.GGUFReader(str(out)).fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, llama_run, monkeypatch):
    from semisparse.export import gguf_writer

    out = tmp_path / "m.gguf"
    out.write_bytes(b"an older file")

    def half_written(path, *args):
        Path(path).write_bytes(b"GGUF half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf_writer, "write_file", half_written)
    with pytest.raises(UserError, match="cannot write .*m.gguf: No space left on device"):
        export(llama_run, out, overwrite=True)
    assert out.read_bytes() == b"an older file" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_pipeline_export_stage_does_not_take_gguf(tmp_path, tiny_dir, text, cli):
    """The pipeline's export stage writes a folder (OUT/export): the one-file format is refused there."""
    line = one_line_error(cli("run", tiny_dir, "--out", tmp_path / "o", "--method", "magnitude", "--data", text,
                              "--stages", "prune", "--export", "gguf"))
    assert "export.format" in line and "gguf" in line
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------- the shipped model


@pytest.mark.realmodel
def test_pruned_smollm2_to_q8_0(tmp_path):
    """SmolLM2-135M pruned 2:4: a few tensors round trip within Q8_0's bound with the zeros exact; the tokenizer
    keys are the shipped GGUF's (copied), and building them from the run's tokenizer files gives the same."""
    from semisparse.export.gguf_writer import hf_tokenizer_kvs
    from semisparse.models import default_gguf_path

    run = tmp_path / "run"
    api.prune("default", "magnitude", "2:4", out=run, device="cpu", progress=False)
    record = export(run, tmp_path / "m.gguf", quant="q8_0")
    assert record["tokenizer"] == str(default_gguf_path())
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    cfg, masks = config_of(run), load_file(str(run / "masks.safetensors"))
    state = load_file(str(run / "model.safetensors"))
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 + 9 * cfg["num_hidden_layers"] and "output.weight" not in tensors
    for layer, name, heads in [("model.layers.0.self_attn.q_proj", "blk.0.attn_q.weight", 9),
                               ("model.layers.7.self_attn.k_proj", "blk.7.attn_k.weight", 3),
                               ("model.layers.29.mlp.down_proj", "blk.29.ffn_down.weight", None)]:
        t = tensors[name]
        values = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64))
        values = rotary_to_hf(values, heads) if heads else values
        ref = state[f"{layer}.weight"].double()
        assert t.tensor_type == Q.Q8_0 and values.shape == ref.shape
        assert bool(((values - ref).abs() <= block_error_bound(ref, Q.Q8_0)).all()), layer
        assert bool((values[~masks[layer]] == 0).all()), layer
    shipped = gguf.GGUFReader(str(default_gguf_path()))
    want = {k: f.contents() for k, f in shipped.fields.items() if k.startswith("tokenizer.")}
    got = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    assert got == want
    built = {kv.key: kv.value for kv in hf_tokenizer_kvs(AutoTokenizer.from_pretrained(run),
                                                          AutoConfig.from_pretrained(run))[0]}
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert built[key] == want[key], key
