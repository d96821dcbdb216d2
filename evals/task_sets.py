"""Named task sets. With local task files (``eval.task_dir`` / ``--task-dir``) a stock task name resolves to
its ``_local`` twin written by ``scripts/fetch_eval_data.py`` when that exists."""

from __future__ import annotations

from pathlib import Path

# The MiLe paper's benchmarks (commonsense reasoning, closed-book QA, MMLU); run 0-shot and 5-shot.
PAPER = [
    "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "social_iqa", "boolq", "sciq",
    "lambada_openai", "triviaqa", "nq_open", "mmlu",
]  # fmt: skip
# Cheap enough to run in the training loop (with eval.limit).
QUICK = ["piqa", "arc_easy", "lambada_openai"]
TASK_SETS = {"paper": PAPER, "quick": QUICK}


def resolve_tasks(names: list[str], task_dir: str = "") -> list[str]:
    tasks: list[str] = []
    for name in names:
        tasks.extend(TASK_SETS.get(name, [name]))
    if task_dir:
        local = Path(task_dir)
        tasks = [f"{t}_local" if (local / f"{t}_local.yaml").is_file() else t for t in tasks]
    return list(dict.fromkeys(tasks))


def check_tasks(names: list[str], task_dir: str = "") -> list[str]:
    """The lm-eval task names ``names`` resolve to, or ValueError naming those lm-eval does not know.

    Checked before training starts: a typo found after hours of training would lose the run's evaluation."""
    tasks = resolve_tasks(names, task_dir)
    if not tasks:
        return tasks
    from lm_eval.tasks import TaskManager

    if task_dir:
        if not Path(task_dir).is_dir():
            raise ValueError(f"eval task directory not found: {task_dir!r}")
        manager = TaskManager(include_path=str(Path(task_dir).resolve()), include_defaults=False)
        where = f"in {task_dir!r}"
    else:
        manager = TaskManager()
        where = "in lm-eval's task index"
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        sets = ", ".join(sorted(TASK_SETS))
        shown = sorted(known) if len(known) <= 20 else f"{len(known)} tasks, e.g. {sorted(known)[:10]}"
        raise ValueError(f"unknown task(s) {unknown} {where} (task sets: {sets}); available: {shown}")
    return tasks
