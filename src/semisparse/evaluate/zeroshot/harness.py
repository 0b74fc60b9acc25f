"""The bridge to EleutherAI lm-evaluation-harness: built-in task configs, offline tasks, and ``run_zeroshot``.

``run_zeroshot`` wraps an already-loaded model and tokenizer in the harness's own HF model class
(``lm_eval.models.huggingface.HFLM``) and scores it with ``lm_eval.simple_evaluate``. Prompts, answer choices,
log-likelihood requests, metrics and standard errors are all the harness's; this module only chooses the tasks,
feeds the data and reshapes the result.

Offline, each built-in task's YAML config is loaded from the installed lm-eval package (through its
``TaskManager`` index and YAML loader, ``!function`` helpers included) and only its data source is replaced by
the converted local documents, handed over as an in-memory ``datasets.Dataset`` through the config's
``custom_dataset`` hook. The split keeps its built-in name, so ``process_docs``, ``doc_to_text``,
``doc_to_choice``, ``doc_to_target``, ``target_delimiter``, the metric list and the harness version metadata are
exactly those of the built-in task. lm-eval is imported only when a function here needs it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from semisparse.errors import UserError
from semisparse.evaluate.zeroshot.tasks import TASKS, check_zeroshot_args, load_local_docs, missing_files


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


def finite_number(v: Any) -> float | None:
    """``v`` as a float if it is a finite number (lm-eval writes "N/A" for a missing stderr), else None."""
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
    skip_missing: bool = False,
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
        skip_missing: with ``task_data``, score the tasks whose files are there and report the others under
            ``"missing"``; without it, missing task files are a UserError (see ``check_task_files``).
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
        UserError: unknown task, ``limit`` <= 0, missing ``task_data`` folder, missing task files (unless
        ``skip_missing``; always when every task is missing), malformed local file, lm-eval not installed.
    """
    names = check_zeroshot_args(tasks, task_data, limit, batch_size, skip_missing=skip_missing)
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
                result["missing_files"][name] = [str(p) for p in missing_files(name, task_data)]
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
            entry[metric] = finite_number(value)
            entry[f"{metric}_stderr"] = finite_number(res.get(f"{metric}_stderr,none"))
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
