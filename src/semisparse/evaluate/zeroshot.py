"""Zero-shot accuracy with EleutherAI lm-evaluation-harness, used as a library.

``run_zeroshot`` wraps an already-loaded model and tokenizer in the harness's own HF model class
(``lm_eval.models.huggingface.HFLM``) and scores it with ``lm_eval.simple_evaluate``. Prompts,
answer choices, log-likelihood requests, metrics and standard errors are all the harness's; this
module only chooses the tasks, feeds the data and reshapes the result.

Online (``task_data=None``) the harness's built-in tasks are used by name and download their data
sets from the Hugging Face hub as usual.

Offline (``task_data`` a folder laid out like ``shared/data``: ``arc_easy/ARC-Easy-Test.jsonl``,
``hellaswag/hellaswag_val_full.txt``, ...; see ``TASKS``) each built-in task's YAML config is loaded
from the installed lm-eval package (through its ``TaskManager`` index and YAML loader, ``!function``
helpers included) and only its data source is replaced: the local file is converted, document by
document, into the field layout of the hub data set the built-in task reads (e.g. ARC:
``{id, question, choices: {text, label}, answerKey}``) and handed to the task as an in-memory
``datasets.Dataset`` through the config's ``custom_dataset`` hook. The split keeps its built-in name
(``test`` for ARC/OpenBookQA/LAMBADA, ``validation`` for the others), so ``process_docs``,
``doc_to_text``, ``doc_to_choice``, ``doc_to_target``, ``target_delimiter``, the metric list and
the harness version metadata are exactly those of the built-in task. Nothing is downloaded.

Known differences between the local files and the hub data sets (offline mode only):

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
- arc_challenge: there is no local copy in ``shared/data``; it is reported under ``missing`` unless
  ``arc_challenge/ARC-Challenge-Test.jsonl`` (official ARC jsonl format) is present.

The result reports every metric of the built-in task (``acc``, ``acc_norm`` where the task has it,
``perplexity`` for LAMBADA) with its standard error, the number of documents scored and in the
split, the tasks whose files are missing, and the mean ``acc`` over the tasks that ran.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from semisparse.data import read_jsonl as _read_jsonl
from semisparse.errors import UserError

__all__ = ["KNOWN_TASKS", "TASKS", "TaskSpec", "build_offline_task", "builtin_task_config", "load_local_docs", "run_zeroshot"]


# --------------------------------------------------------------------------------------------
# Local files -> documents in the built-in tasks' (hub) field layout
# --------------------------------------------------------------------------------------------


def _read_labels(path: Path, n: int) -> list[str]:
    labels = path.read_text(encoding="utf-8").split()
    if len(labels) != n:
        raise UserError(f"{path}: {len(labels)} labels for {n} documents")
    return labels


def _arc(paths: list[Path]) -> list[dict]:
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


def _hellaswag(paths: list[Path]) -> list[dict]:
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


def _piqa(paths: list[Path]) -> list[dict]:
    """valid.jsonl + valid-labels.lst -> baber/piqa: {goal, sol1, sol2, label}."""
    rows = _read_jsonl(paths[0])
    labels = _read_labels(paths[1], len(rows))
    docs = []
    for row, label in zip(rows, labels):
        if label not in {"0", "1"}:
            raise UserError(f"{paths[1]}: label must be 0 or 1, got {label!r}")
        docs.append({"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"], "label": int(label)})
    return docs


def _winogrande(paths: list[Path]) -> list[dict]:
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


def _boolq(paths: list[Path]) -> list[dict]:
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


def _rte(paths: list[Path]) -> list[dict]:
    """GLUE RTE jsonl -> nyu-mll/glue rte: {sentence1, sentence2, label (0 = entailment), idx}."""
    docs = []
    for i, row in enumerate(_read_jsonl(paths[0])):
        if row["label"] not in (0, 1):
            raise UserError(f"{paths[0]}:{i + 1}: label must be 0 or 1, got {row['label']!r}")
        docs.append({"sentence1": row["sentence1"], "sentence2": row["sentence2"], "label": int(row["label"]), "idx": int(row.get("idx", i))})
    return docs


def _openbookqa(paths: list[Path]) -> list[dict]:
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


def _lambada(paths: list[Path]) -> list[dict]:
    """EleutherAI/lambada_openai: {text} (the local file is the same data)."""
    return [{"text": row["text"]} for row in _read_jsonl(paths[0])]


_COPA_CONNECTORS = {", because": "cause", ", therefore": "effect"}


def _copa(paths: list[Path]) -> list[dict]:
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


@dataclass(frozen=True)
class TaskSpec:
    """A supported task: where lm-eval keeps its built-in YAML, and which local files feed it offline."""

    name: str
    lm_eval_dir: str  # folder under lm_eval/tasks holding the built-in YAML
    files: tuple[str, ...]  # local files relative to task_data, all required
    convert: Callable[[list[Path]], list[dict]]
    note: str | None = None  # known difference between the local file and the hub data set


TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in [
        TaskSpec("boolq", "super_glue", ("boolq/boolq_dev_question_passage_label.jsonl",), _boolq,
                 "local passages lack the SuperGLUE '<title> -- ' prefix"),
        TaskSpec("rte", "glue", ("rte/rte_validation.jsonl",), _rte),
        TaskSpec("hellaswag", "hellaswag", ("hellaswag/hellaswag_val_full.txt",), _hellaswag,
                 "context not re-capitalised (ctx_b.capitalize() unavailable): within a few tenths of a point of lm-eval"),
        TaskSpec("winogrande", "winogrande", ("winogrande/dev.jsonl",), _winogrande),
        TaskSpec("arc_easy", "arc", ("arc_easy/ARC-Easy-Test.jsonl",), _arc),
        TaskSpec("arc_challenge", "arc", ("arc_challenge/ARC-Challenge-Test.jsonl",), _arc),
        TaskSpec("openbookqa", "openbookqa", ("openbookqa/llmfoundry_openbook_qa.jsonl",), _openbookqa),
        TaskSpec("piqa", "piqa", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), _piqa),
        TaskSpec("lambada_openai", "lambada", ("lambada_openai/lambada_test.jsonl",), _lambada),
        TaskSpec("copa", "super_glue", ("copa/llmfoundry_copa.jsonl",), _copa),
    ]
}
KNOWN_TASKS: tuple[str, ...] = tuple(TASKS)


def load_local_docs(name: str, task_data: Path) -> list[dict] | None:
    """The documents of task ``name`` from ``task_data``, in the built-in task's field layout; None if files are missing."""
    spec = TASKS[name]
    paths = [Path(task_data) / f for f in spec.files]
    if not all(p.is_file() for p in paths):
        return None
    try:
        docs = spec.convert(paths)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise UserError(f"{paths[0]}: unexpected layout for {name} ({type(e).__name__}: {e})") from None
    if not docs:
        raise UserError(f"{paths[0]}: no documents")
    return docs


# --------------------------------------------------------------------------------------------
# Built-in task configs with a local data source
# --------------------------------------------------------------------------------------------


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as e:
        raise UserError(f"zero-shot evaluation needs lm-evaluation-harness: pip install 'semisparse[eval]' ({e})") from None
    return lm_eval


_TASK_MANAGERS: dict[tuple[str, ...], Any] = {}


def _task_manager(names: Sequence[str]):
    """An lm-eval TaskManager that indexes the built-in YAMLs of ``names``.

    Indexing only their folders avoids scanning all ~15k built-in YAMLs (about 10 s); if a name is
    not found there (a future lm-eval that moved a task), fall back to the full default index.
    """
    _import_lm_eval()
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    key = tuple(sorted(set(names)))
    if key not in _TASK_MANAGERS:
        root = Path(lm_eval.tasks.__file__).parent
        dirs = sorted({str(root / TASKS[n].lm_eval_dir) for n in key if (root / TASKS[n].lm_eval_dir).is_dir()})
        tm = TaskManager(include_defaults=False, include_path=dirs) if dirs else None
        if tm is None or any(n not in tm.task_index for n in key):
            tm = TaskManager()
        _TASK_MANAGERS[key] = tm
    return _TASK_MANAGERS[key]


def builtin_task_config(name: str, task_manager=None) -> dict[str, Any]:
    """The built-in task's config dict as lm-eval's TaskFactory builds it (YAML + includes + !function helpers)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    tm = task_manager or _task_manager([name])
    entry = tm.task_index.get(name)
    if entry is None or entry.yaml_path is None:
        raise UserError(f"lm-eval has no built-in YAML task {name!r}")
    cfg = load_yaml(entry.yaml_path, resolve_func=True)
    for key in ("tag", "group", "task_list"):  # structural keys, dropped by TaskFactory too
        cfg.pop(key, None)
    meta = cfg.get("metadata") or {}
    cfg["metadata"] = {**(meta if isinstance(meta, dict) else {"_metadata": meta}), "config_source": str(entry.yaml_path)}
    return cfg


class _InMemoryDataset:
    """``custom_dataset`` hook: lm-eval calls it (with the task's metadata as keywords) instead of load_dataset."""

    def __init__(self, split: str, docs: list[dict], source: str):
        self.split, self.docs, self.source = split, docs, source

    def __call__(self, **_kwargs):
        import datasets

        return datasets.DatasetDict({self.split: datasets.Dataset.from_list(self.docs)})

    def __repr__(self) -> str:
        return f"<local data {self.source}: {len(self.docs)} docs as split {self.split!r}>"


def build_offline_task(name: str, docs: list[dict], source: str = "local", task_manager=None):
    """An lm-eval ``ConfigurableTask`` equal to the built-in ``name`` except that it reads ``docs``.

    ``docs`` must be in the built-in task's (hub) field layout. Only the data-source keys of the
    config change; the split the harness evaluates keeps its built-in name, and the other splits
    are dropped (zero-shot: no few-shot pool is needed).
    """
    _import_lm_eval()
    from lm_eval.api.task import ConfigurableTask

    cfg = builtin_task_config(name, task_manager)
    split = cfg.get("test_split") or cfg.get("validation_split")
    if not split:
        raise UserError(f"built-in task {name} has no test or validation split")
    is_test = bool(cfg.get("test_split"))
    cfg.update(
        dataset_path=source,
        dataset_name=None,
        dataset_kwargs=None,
        custom_dataset=_InMemoryDataset(split, docs, source),
        training_split=None,
        validation_split=None if is_test else split,
        test_split=split if is_test else None,
        fewshot_split=None,
    )
    return ConfigurableTask(config=cfg)


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def check_zeroshot_args(tasks, task_data, limit, batch_size) -> list[str]:
    if isinstance(tasks, str):
        tasks = [tasks]
    names = list(dict.fromkeys(str(t).strip() for t in tasks))
    if not names:
        raise UserError(f"no zero-shot tasks given; known tasks: {', '.join(KNOWN_TASKS)}")
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise UserError(f"unknown zero-shot task(s) {', '.join(map(repr, unknown))}; known tasks: {', '.join(KNOWN_TASKS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise UserError(f"limit must be a positive number of documents, got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    if task_data is not None and not Path(task_data).is_dir():
        raise UserError(f"task data folder not found: {task_data}")
    return names


def _num(v: Any) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def _slim_sample(s: dict) -> dict:
    out = {
        "doc_id": s["doc_id"],
        "target": s["target"],
        "arguments": [list(a) for a in s["arguments"]],
        "loglikelihoods": [[float(r[0]), bool(r[1])] if isinstance(r, (tuple, list)) else r for r in s["filtered_resps"]],
    }
    for m in s.get("metrics", []):
        v = s.get(m)
        out[m] = v if not isinstance(v, (tuple, list)) else list(v)
    return out


def run_zeroshot(
    model,
    tokenizer,
    tasks: list[str],
    task_data: Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device="cpu",
    *,
    log_samples: bool = False,
    bootstrap_iters: int = 1000,
) -> dict:
    """Zero-shot scores of ``model`` on ``tasks`` (names from ``KNOWN_TASKS``), computed by lm-eval.

    Args:
        model: a loaded ``transformers`` causal LM; moved to ``device`` (None: left where it is).
        tokenizer: its tokenizer.
        tasks: task names; duplicates are ignored.
        task_data: folder with the local data files (layout of ``shared/data``); None: the
            harness downloads its own data sets from the hub.
        limit: score only the first ``limit`` documents of each task.
        batch_size: harness batch size.
        log_samples: also return, per task, the harness's per-document outputs (arguments,
            log-likelihoods, per-document metric values) under ``"samples"``.
        bootstrap_iters: harness bootstrap draws; only bootstrapped metrics (LAMBADA perplexity)
            use them, ``acc``/``acc_norm`` standard errors are closed-form.

    Returns:
        ``{"tasks": {name: {metric: value, metric + "_stderr": value, "n_docs": scored,
        "n_docs_total": in split, "source": path or hub id, "note": known difference or None}},
        "missing": [names whose local files are absent], "missing_files": {name: [paths]},
        "mean_acc": mean acc over tasks that ran (None if none ran), "mean_acc_over": [names],
        "mode": "offline" | "online", "task_data", "limit", "num_fewshot": 0, "lm_eval_version"}``
        (plus ``"samples"`` when ``log_samples``).

    Raises:
        UserError: unknown task, ``limit`` <= 0, missing ``task_data`` folder, malformed local file,
        lm-eval not installed.
    """
    names = check_zeroshot_args(tasks, task_data, limit, batch_size)
    lm_eval = _import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    offline = task_data is not None
    task_data = Path(task_data) if offline else None
    result: dict[str, Any] = {
        "tasks": {},
        "missing": [],
        "missing_files": {},
        "mean_acc": None,
        "mean_acc_over": [],
        "mode": "offline" if offline else "online",
        "task_data": str(task_data) if offline else None,
        "limit": limit,
        "num_fewshot": 0,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
    }
    if log_samples:
        result["samples"] = {}

    task_manager = _task_manager(names)
    to_run: list = []
    sources: dict[str, str] = {}
    totals: dict[str, int] = {}
    if offline:
        for name in names:
            docs = load_local_docs(name, task_data)
            if docs is None:
                result["missing"].append(name)
                result["missing_files"][name] = [str(task_data / f) for f in TASKS[name].files if not (task_data / f).is_file()]
                continue
            sources[name] = str(task_data / TASKS[name].files[0])
            totals[name] = len(docs)
            # The harness's --limit takes the first `limit` documents of the split (none of these
            # tasks' process_docs filters or reorders), so handing it only those is the same and
            # spares e.g. hellaswag's process_docs running over all 10042 items several times.
            docs = docs[:limit] if limit is not None else docs
            to_run.append(build_offline_task(name, docs, sources[name], task_manager))
    else:
        for name in names:
            cfg = task_manager.task_index[name].cfg or {}
            sources[name] = f"hub:{cfg.get('dataset_path')}" + (f"/{cfg['dataset_name']}" if cfg.get("dataset_name") else "")
            to_run.append(name)
    if not to_run:
        return result

    if device is not None:
        model.to(device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=to_run,
        num_fewshot=0,
        limit=limit,
        bootstrap_iters=bootstrap_iters,
        log_samples=log_samples,
        task_manager=task_manager,
    )
    if out is None:  # non-zero rank in a distributed launch
        return result

    accs = []
    for name in names:
        if name in result["missing"]:
            continue
        res = out["results"][name]
        entry: dict[str, Any] = {}
        for key, value in res.items():
            metric, _, filt = key.partition(",")
            if filt != "none" or metric.endswith("_stderr"):
                continue
            entry[metric] = _num(value)
            entry[f"{metric}_stderr"] = _num(res.get(f"{metric}_stderr,none"))
        counts = out.get("n-samples", {}).get(name, {})
        entry["n_docs"] = counts.get("effective")
        entry["n_docs_total"] = totals.get(name, counts.get("original"))
        entry["source"] = sources[name]
        entry["note"] = TASKS[name].note if offline else None
        result["tasks"][name] = entry
        if entry.get("acc") is not None:
            accs.append(entry["acc"])
            result["mean_acc_over"].append(name)
        if log_samples:
            result["samples"][name] = [_slim_sample(s) for s in out.get("samples", {}).get(name, [])]
    result["mean_acc"] = sum(accs) / len(accs) if accs else None
    return result


# --------------------------------------------------------------------------------------------
# Display
# --------------------------------------------------------------------------------------------


def zeroshot_table(result: dict) -> "rich.table.Table":  # noqa: F821 (rich imported lazily)
    """A rich table of a ``run_zeroshot`` result: task, acc ± stderr, acc_norm ± stderr, documents scored.

    Values are percentages; tasks without ``acc_norm`` get an empty cell. Tasks whose local files are
    missing get a ``missing`` row; the last row is the mean ``acc`` over the tasks that ran.
    """
    from rich.table import Table

    def pct(entry: dict, metric: str) -> str:
        value = _num(entry.get(metric))
        if value is None:
            return ""
        err = _num(entry.get(f"{metric}_stderr"))
        return f"{100 * value:.2f}" + (f" ± {100 * err:.2f}" if err is not None else "")

    limit = result.get("limit")
    title = f"zero-shot ({result.get('mode', '?')}" + (f", limit {limit}" if limit is not None else "") + ")"
    table = Table(title=title)
    table.add_column("task")
    table.add_column("acc (%)", justify="right")
    table.add_column("acc_norm (%)", justify="right")
    table.add_column("n docs", justify="right")
    for name, entry in (result.get("tasks") or {}).items():
        n, total = entry.get("n_docs"), entry.get("n_docs_total")
        docs = "" if n is None else (f"{n}/{total}" if total is not None and total != n else f"{n}")
        table.add_row(name, pct(entry, "acc"), pct(entry, "acc_norm"), docs)
    for name in result.get("missing") or []:
        table.add_row(name, "missing", "missing", "", style="dim")
    mean = _num(result.get("mean_acc"))
    over = result.get("mean_acc_over") or []
    table.add_section()
    table.add_row(f"mean ({len(over)} tasks)", "" if mean is None else f"{100 * mean:.2f}", "", "", style="bold")
    return table


__all__ += ["zeroshot_table"]
