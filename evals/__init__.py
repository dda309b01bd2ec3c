"""The evaluation harness: tasks, sweeps of manipulations over layers, plots and reports.

The public Python API (documented in docs/evals.md):

    task_from_pairs     a QA task from (question, answers) pairs
    task_from_file      a task from a SQuAD or JSON-lines file
    get_task, TASKS     the built-in tasks
    sweep               every task under each manipulation at each k, results returned in memory
    plot                the score-vs-k figure of a sweep result
"""

from evals.api import plot, sweep, task_from_file, task_from_pairs
from evals.tasks import TASKS, Example, Task, get_task

__all__ = ["TASKS", "Example", "Task", "get_task", "plot", "sweep", "task_from_file", "task_from_pairs"]
