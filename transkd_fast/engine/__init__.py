"""Training, distillation and evaluation.

``train(TrainConfig)``, ``distill(TrainConfig)``, ``evaluate(model, loader)`` or
``evaluate(EvalConfig)``; the demo (``run_demo(DemoConfig)``); the CLI subcommands live in
:mod:`transkd_fast.engine.commands`.
"""

from transkd_fast.engine.config import DataConfig, EvalConfig, TrainConfig
from transkd_fast.engine.metrics import ConfusionMatrix, metrics_from_confusion
from transkd_fast.engine.trainer import NonFiniteLossError, RunResult, distill, evaluate, train

__all__ = [
    "ConfusionMatrix", "DataConfig", "EvalConfig", "NonFiniteLossError", "RunResult", "TrainConfig", "distill",
    "evaluate", "metrics_from_confusion", "train",
]
