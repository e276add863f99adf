"""Task registry: ``get_task(name)`` returns the task's singleton implementation."""

from __future__ import annotations

from tripost_ray.tasks.base import SPLITS, Problem, ProblemFormatError, Split, Task, load_problems

#: name -> "module:Class"; imported lazily so a task's dependencies load only when used.
TASKS: dict[str, str] = {
    "multistep_arithmetic": "tripost_ray.tasks.arithmetic:ArithmeticTask",
    "word_sorting": "tripost_ray.tasks.word_sorting:WordSortingTask",
    "date_understanding": "tripost_ray.tasks.date_understanding:DateUnderstandingTask",
    "logical_deduction": "tripost_ray.tasks.logical_deduction:LogicalDeductionTask",
}


class UnknownTaskError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want a sentence
        return str(self.args[0])


def get_task(name: str, **options) -> Task:
    """The task called ``name`` (options are task-specific difficulty settings)."""
    if name not in TASKS:
        raise UnknownTaskError(f"unknown task {name!r}; allowed: {sorted(TASKS)}")
    import importlib
    import inspect

    module, cls = TASKS[name].split(":")
    task_cls = getattr(importlib.import_module(module), cls)
    params = inspect.signature(task_cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        allowed = [p for p in params if p != "self"]
        for key in options:
            if key not in allowed:  # a typo in task.difficulty: say so instead of a TypeError
                raise ValueError(f"task {name} has no option {key!r}; allowed: {', '.join(allowed) or 'none'}")
    return task_cls(**options)


__all__ = ["SPLITS", "TASKS", "Problem", "ProblemFormatError", "Split", "Task", "get_task", "load_problems"]
