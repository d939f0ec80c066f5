"""The main job behind ``python -m metakernels train``: meta-train a model on a task family with the
chosen algorithms, train the baselines, evaluate all of them on held-out tasks (see :mod:`.runner`)."""
from .config import ALGORITHMS, TASKS, TrainConfig
from .runner import RunResult, run

__all__ = ["ALGORITHMS", "TASKS", "TrainConfig", "RunResult", "run"]
