"""Zero-shot accuracy with EleutherAI lm-evaluation-harness, used as a library.

Online (``task_data=None``) the harness's built-in tasks are used by name and download their data sets from the
Hugging Face hub as usual. Offline (``task_data`` a folder laid out like ``shared/data``:
``arc_easy/ARC-Easy-Test.jsonl``, ``hellaswag/hellaswag_val_full.txt``, ...; see ``TASKS``) each built-in task
reads the local file, converted into the hub data set's field layout; nothing is downloaded. Asked tasks whose
files are missing are an error unless ``skip_missing`` (then reported under ``missing``).

The result reports every metric of the built-in task (``acc``, ``acc_norm`` where the task has it,
``perplexity`` for LAMBADA) with its standard error, the number of documents scored and in the split, the tasks
whose files are missing, and the mean ``acc`` over the tasks that ran.

Modules: ``converters`` (local files -> hub layout, and their known differences), ``tasks`` (the task table and
the argument checks, no lm-eval needed), ``harness`` (the lm-eval bridge and ``run_zeroshot``), ``table``
(the console table).
"""

from semisparse.evaluate.zeroshot.harness import build_offline_task, builtin_task_config, run_zeroshot
from semisparse.evaluate.zeroshot.table import zeroshot_table
from semisparse.evaluate.zeroshot.tasks import (
    KNOWN_TASKS,
    TASKS,
    TaskSpec,
    check_task_files,
    check_zeroshot_args,
    load_local_docs,
    missing_files,
)

__all__ = [
    "KNOWN_TASKS",
    "TASKS",
    "TaskSpec",
    "build_offline_task",
    "builtin_task_config",
    "check_task_files",
    "check_zeroshot_args",
    "load_local_docs",
    "missing_files",
    "run_zeroshot",
    "zeroshot_table",
]
