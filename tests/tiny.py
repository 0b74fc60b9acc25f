"""Tiny randomly initialised models, a tiny byte-level tokenizer (no hub access), and where the standard data is."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# ---- the standard data sets (real files; see shared/data/README.md). The ONE place tests look for them.
DATA_ENV = "SEMISPARSE_DATA"
# The files of the standard layout that tests read (relative to the data folder), as listed in its README.
STANDARD_FILES = (
    "arc_challenge/ARC-Challenge-Test.jsonl",
    "arc_easy/ARC-Easy-Test.jsonl",
    "boolq/boolq_dev_question_passage_label.jsonl",
    "boolq/llmfoundry_boolq.jsonl",
    "c4/c4_train_shard0_first1000.jsonl",
    "c4/c4_validation_2k.jsonl",
    "copa/llmfoundry_copa.jsonl",
    "hellaswag/hellaswag_val_full.txt",
    "lambada_openai/lambada_test.jsonl",
    "openbookqa/llmfoundry_openbook_qa.jsonl",
    "piqa/valid.jsonl",
    "piqa/valid-labels.lst",
    "rte/glue_rte_validation-00000-of-00001.parquet",
    "rte/rte_validation.jsonl",
    "wikitext2/wiki.valid.raw",
    "wikitext2/wikitext_document_level_validation.jsonl",
    "winogrande/dev-labels.lst",
    "winogrande/dev.jsonl",
)


def standard_data_dir() -> Path:
    """``$SEMISPARSE_DATA`` if set (and not empty), else ``shared/data`` beside the project root."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else PROJECT_ROOT.parent / "shared" / "data"


def standard_data_problem(files=STANDARD_FILES) -> str | None:
    """Why the standard data cannot serve a test that reads ``files`` (None: it can)."""
    root = standard_data_dir()
    hint = f"set {DATA_ENV} or put shared/data beside the project"
    if not root.is_dir() or not any((root / f).is_file() for f in STANDARD_FILES):
        return f"standard data not found at {root} ({hint})"
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        return f"standard data at {root} lacks {', '.join(missing)} ({hint})"
    return None

VOCAB = 384

_SAMPLE = (
    "The quick brown fox jumps over the lazy dog. Semi-structured sparsity keeps two of every four weights. "
    "Language models predict the next token from the previous ones. 0123456789 "
) * 20


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_SAMPLE], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def make_llama(seed: int = 0, hidden: int = 64, layers: int = 2, max_pos: int = 256) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_pos,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def make_gpt2(seed: int = 0, hidden: int = 64, layers: int = 2, max_pos: int = 256) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=4, n_positions=max_pos,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def save_model_dir(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def magnitude_run(model_dir: Path, out: Path, pattern: str = "2:4") -> Path:
    """A `semisparse prune` run directory of a tiny model (magnitude, no calibration)."""
    from semisparse import api

    api.prune(str(model_dir), "magnitude", pattern, out=out, device="cpu", progress=False)
    return out


def slorb_run(model_dir: Path, text: Path, out: Path) -> Path:
    """A 2-step AST-Boosted run (SLoRB with trainable X) of a tiny model on ``text``."""
    from semisparse.train import trainer

    overrides = {
        "data.train": str(text), "train.tokens": 2 * 2 * 16, "train.seq_len": 16, "train.batch_size": 2,
        "eval.windows": 1, "eval.every": 0, "eval.at_start": False, "eval.at_end": False, "checkpoint.every": 0,
        "log.plots": False, "init.calib_samples": 4, "optim.lr": 1e-2, "slorb.k": 8,
    }
    trainer.train(str(model_dir), out, "ast-boosted", overrides, progress=False)
    return out
