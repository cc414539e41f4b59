"""`vlmkit eval`: benchmarks read from their published files, answered in batches through the engine and
scored with their official metrics (see `vlmkit.eval.tasks` for the list)."""

from vlmkit.eval.data import DataError, Sample
from vlmkit.eval.run import EvalResult, evaluate
from vlmkit.eval.tasks import TASKS, Task, get_task

__all__ = ["TASKS", "DataError", "EvalResult", "Sample", "Task", "evaluate", "get_task"]
