"""The supported zero-shot tasks: their lm-eval YAML folder, their local files, and checks of the arguments.

Nothing here needs lm-eval, so arguments and task files can be checked before a model is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from semisparse.errors import UserError
from semisparse.evaluate.zeroshot import converters


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
        TaskSpec("boolq", "super_glue", ("boolq/boolq_dev_question_passage_label.jsonl",), converters.boolq,
                 "local passages lack the SuperGLUE '<title> -- ' prefix"),
        TaskSpec("rte", "glue", ("rte/rte_validation.jsonl",), converters.rte),
        TaskSpec("hellaswag", "hellaswag", ("hellaswag/hellaswag_val_full.txt",), converters.hellaswag,
                 "context not re-capitalised (ctx_b.capitalize() unavailable): within a few tenths of a point of lm-eval"),
        TaskSpec("winogrande", "winogrande", ("winogrande/dev.jsonl",), converters.winogrande),
        TaskSpec("arc_easy", "arc", ("arc_easy/ARC-Easy-Test.jsonl",), converters.arc),
        TaskSpec("arc_challenge", "arc", ("arc_challenge/ARC-Challenge-Test.jsonl",), converters.arc),
        TaskSpec("openbookqa", "openbookqa", ("openbookqa/llmfoundry_openbook_qa.jsonl",), converters.openbookqa),
        TaskSpec("piqa", "piqa", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), converters.piqa),
        TaskSpec("lambada_openai", "lambada", ("lambada_openai/lambada_test.jsonl",), converters.lambada),
        TaskSpec("copa", "super_glue", ("copa/llmfoundry_copa.jsonl",), converters.copa),
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


def missing_files(name: str, task_data: Path) -> list[Path]:
    """The local files of task ``name`` that are not in ``task_data``."""
    return [Path(task_data) / f for f in TASKS[name].files if not (Path(task_data) / f).is_file()]


def check_zeroshot_args(tasks, task_data, limit, batch_size, *, skip_missing: bool = False) -> list[str]:
    """The task names (duplicates dropped), after checking every argument; one-line UserError otherwise.

    With ``task_data``, tasks whose local files are missing are an error listing them and their files, unless
    ``skip_missing`` (then ``run_zeroshot`` reports them under ``missing``); asking only for missing tasks is an
    error either way.
    """
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
    if task_data is not None:
        if not Path(task_data).is_dir():
            raise UserError(f"task data folder not found: {task_data}")
        check_task_files(names, Path(task_data), skip_missing=skip_missing)
    return names


def check_task_files(names: list[str], task_data: Path, *, skip_missing: bool = False) -> dict[str, list[Path]]:
    """{task: its missing files} for the tasks of ``names`` that cannot run from ``task_data``.

    Raises UserError (one line: each missing task with its files) when every task is missing, or when some are
    and not ``skip_missing``: a silently shorter task list would change the mean accuracy.
    """
    missing = {name: files for name in names if (files := missing_files(name, task_data))}
    if not missing:
        return missing
    listing = "; ".join(
        f"{name} ({', '.join(str(p.relative_to(task_data)) for p in files)})" for name, files in missing.items()
    )
    if len(missing) == len(names):
        raise UserError(f"no files in {task_data} for the zero-shot task(s) asked for: {listing}")
    if not skip_missing:
        raise UserError(
            f"zero-shot task files missing in {task_data}: {listing}; add them, leave those tasks out, "
            "or pass --skip-missing to score the others"
        )
    return missing
