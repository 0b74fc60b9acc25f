"""Local task files -> documents in the field layout of the hub data set each built-in lm-eval task reads.

One converter per file format; each takes the task's file paths (``TaskSpec.files``, in order) and returns the
documents, raising a one-line UserError naming the file (and line) on malformed input.

Known differences between the local files and the hub data sets:

- hellaswag: the local file holds the context already joined as ``"<activity_label>: <ctx>"``
  without the separate ``ctx_a``/``ctx_b`` fields, so the harness's ``ctx_b.capitalize()`` cannot be
  applied (lm-eval writes "... on a roof. He", the file has "... on a roof. he"). The built-in
  ``process_docs``/``preprocess`` still runs on the converted documents (it also removes the few
  ``[...]`` WikiHow artefacts left in the file). Scores land within a few tenths of a point of
  lm-eval's, not bit-identical.
- boolq: the local file has no ``"<title> -- "`` prefix in front of the passage that the SuperGLUE
  copy used by lm-eval carries, so the prompt lacks that prefix.
- copa: the local file is the llm-foundry form (``"<premise without final period>, therefore"``,
  choices already lower-cased); the premise is rebuilt so that the built-in ``doc_to_text`` yields
  lm-eval's exact prompt (``"<premise without final period> therefore"``, no comma).
- openbookqa: the llm-foundry form stores the question stem and the four choices; labels ``A``-``D``
  and ``answerKey`` are rebuilt from the choice order and ``gold``.
"""

from __future__ import annotations

from pathlib import Path

from semisparse.data import read_jsonl as _read_jsonl
from semisparse.errors import UserError


def _read_labels(path: Path, n: int) -> list[str]:
    labels = path.read_text(encoding="utf-8").split()
    if len(labels) != n:
        raise UserError(f"{path}: {len(labels)} labels for {n} documents")
    return labels


def arc(paths: list[Path]) -> list[dict]:
    """Official ARC jsonl -> allenai/ai2_arc: {id, question, choices: {text, label}, answerKey}."""
    docs = []
    for row in _read_jsonl(paths[0]):
        choices = row["question"]["choices"]
        labels = [str(c["label"]) for c in choices]
        if str(row["answerKey"]) not in labels:
            raise UserError(f"{paths[0]}: answerKey {row['answerKey']!r} of {row['id']} is not a choice label")
        docs.append({
            "id": row["id"],
            "question": row["question"]["stem"],
            "choices": {"text": [c["text"] for c in choices], "label": labels},
            "answerKey": str(row["answerKey"]),
        })
    return docs


def hellaswag(paths: list[Path]) -> list[dict]:
    """6 lines an item (context, gold, 4 endings) -> Rowan/hellaswag fields.

    The file's context is "<activity_label>: <ctx_a> <ctx_b>" already joined, so the whole remainder
    goes to ``ctx_a`` and ``ctx_b`` is empty: the built-in ``process_docs`` then rebuilds
    ``preprocess(activity_label + ": " + ctx_a + " ")`` == the file's context (any ": " split point
    gives the same string). Lost: lm-eval's ``ctx_b.capitalize()`` (see the module docstring).
    """
    path = paths[0]
    lines = [line.rstrip("\r") for line in path.read_text(encoding="utf-8").split("\n")]
    while lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise UserError(f"{path}: {len(lines)} lines, expected 6 per item (context, gold, 4 endings)")
    docs = []
    for i in range(0, len(lines), 6):
        ctx, gold, *endings = lines[i : i + 6]
        activity_label, sep, rest = ctx.partition(": ")
        if not sep:
            raise UserError(f"{path}:{i + 1}: context has no '<activity label>: ' prefix")
        if gold not in {"0", "1", "2", "3"}:
            raise UserError(f"{path}:{i + 2}: gold must be 0-3, got {gold!r}")
        docs.append({
            "ind": i // 6,
            "activity_label": activity_label,
            "ctx_a": rest,
            "ctx_b": "",
            "ctx": rest,
            "endings": endings,
            "source_id": "",
            "split": "val",
            "split_type": "",
            "label": gold,  # a string, as in the hub data set
        })
    return docs


def piqa(paths: list[Path]) -> list[dict]:
    """valid.jsonl + valid-labels.lst -> baber/piqa: {goal, sol1, sol2, label}."""
    rows = _read_jsonl(paths[0])
    labels = _read_labels(paths[1], len(rows))
    docs = []
    for row, label in zip(rows, labels):
        if label not in {"0", "1"}:
            raise UserError(f"{paths[1]}: label must be 0 or 1, got {label!r}")
        docs.append({"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"], "label": int(label)})
    return docs


def winogrande(paths: list[Path]) -> list[dict]:
    """dev.jsonl (+ dev-labels.lst when present) -> allenai/winogrande: {sentence, option1, option2, answer}."""
    rows = _read_jsonl(paths[0])
    labels_path = paths[0].with_name(paths[0].stem + "-labels.lst")
    labels = _read_labels(labels_path, len(rows)) if labels_path.is_file() else [None] * len(rows)
    docs = []
    for n, (row, label) in enumerate(zip(rows, labels), 1):
        answer = str(row.get("answer") or label or "")
        if label is not None and answer != label:
            raise UserError(f"{paths[0]}:{n}: answer {answer!r} disagrees with {labels_path.name} ({label!r})")
        if answer not in {"1", "2"}:
            raise UserError(f"{paths[0]}:{n}: answer must be 1 or 2, got {answer!r}")
        if row["sentence"].count("_") < 1:
            raise UserError(f"{paths[0]}:{n}: sentence has no '_' blank")
        docs.append({"sentence": row["sentence"], "option1": row["option1"], "option2": row["option2"], "answer": answer})
    return docs


def boolq(paths: list[Path]) -> list[dict]:
    """{question, passage, label: bool} -> aps/super_glue boolq: {question, passage, idx, label: 0/1}.

    The SuperGLUE passage starts with "<title> -- "; the local file has no title (documented difference).
    """
    docs = []
    for i, row in enumerate(_read_jsonl(paths[0])):
        label = row["label"]
        if label not in (True, False, 0, 1):
            raise UserError(f"{paths[0]}:{i + 1}: label must be true/false, got {label!r}")
        docs.append({"question": row["question"], "passage": row["passage"], "idx": i, "label": int(label)})
    return docs


def rte(paths: list[Path]) -> list[dict]:
    """GLUE RTE jsonl -> nyu-mll/glue rte: {sentence1, sentence2, label (0 = entailment), idx}."""
    docs = []
    for i, row in enumerate(_read_jsonl(paths[0])):
        if row["label"] not in (0, 1):
            raise UserError(f"{paths[0]}:{i + 1}: label must be 0 or 1, got {row['label']!r}")
        docs.append({"sentence1": row["sentence1"], "sentence2": row["sentence2"], "label": int(row["label"]), "idx": int(row.get("idx", i))})
    return docs


def openbookqa(paths: list[Path]) -> list[dict]:
    """llm-foundry {query, choices, gold} -> allenai/openbookqa main: {id, question_stem, choices: {text, label}, answerKey}."""
    docs = []
    for i, row in enumerate(_read_jsonl(paths[0])):
        choices = list(row["choices"])
        labels = [chr(ord("A") + k) for k in range(len(choices))]
        gold = row["gold"]
        if not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise UserError(f"{paths[0]}:{i + 1}: gold must index the choices, got {gold!r}")
        docs.append({
            "id": str(i),
            "question_stem": row["query"],
            "choices": {"text": choices, "label": labels},
            "answerKey": labels[gold],
        })
    return docs


def lambada(paths: list[Path]) -> list[dict]:
    """EleutherAI/lambada_openai: {text} (the local file is the same data)."""
    return [{"text": row["text"]} for row in _read_jsonl(paths[0])]


_COPA_CONNECTORS = {", because": "cause", ", therefore": "effect"}


def copa(paths: list[Path]) -> list[dict]:
    """llm-foundry {query, choices, gold} -> aps/super_glue copa: {premise, choice1, choice2, question, idx, label}.

    The query is "<premise minus its final period>, because|therefore". The built-in doc_to_text drops
    the premise's last character and appends " because"/" therefore", so the premise is rebuilt as
    "<stem>." to get lm-eval's exact prompt. Choices are already lower-cased the way lm-eval's
    ``convert_choice`` does it (which only lower-cases the first character again).
    """
    docs = []
    for i, row in enumerate(_read_jsonl(paths[0])):
        query = row["query"].rstrip()
        for suffix, question in _COPA_CONNECTORS.items():
            if query.endswith(suffix):
                stem = query[: -len(suffix)]
                break
        else:
            raise UserError(f"{paths[0]}:{i + 1}: query must end with ', because' or ', therefore'")
        if len(row["choices"]) != 2 or row["gold"] not in (0, 1):
            raise UserError(f"{paths[0]}:{i + 1}: expected 2 choices and gold 0 or 1")
        docs.append({
            "premise": stem + ".",
            "choice1": row["choices"][0],
            "choice2": row["choices"][1],
            "question": question,
            "idx": i,
            "label": int(row["gold"]),
        })
    return docs
