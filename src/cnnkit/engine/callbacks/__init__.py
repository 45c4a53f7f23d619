"""Callbacks for fit(): the Keras hooks, History, the progress bar, early stopping, weight selection, EMA,
TensorBoard logging, stopping on a NaN loss, a time budget.

A user's own callback subclasses `Callback` and is passed as `fit(..., callbacks=[...])`.
"""

from cnnkit.engine.callbacks.base import BatchLogs, Callback, CallbackList, Phase, TrainState, show_order
from cnnkit.engine.callbacks.budget import TimeBudget
from cnnkit.engine.callbacks.early_stopping import EarlyStopping
from cnnkit.engine.callbacks.ema import EMA
from cnnkit.engine.callbacks.freeze import FreezeBackbone
from cnnkit.engine.callbacks.history import History
from cnnkit.engine.callbacks.progress import ProgressBar
from cnnkit.engine.callbacks.selection import WeightSelection
from cnnkit.engine.callbacks.tensorboard import TensorBoardLogger
from cnnkit.engine.callbacks.terminate_on_nan import TerminateOnNaN

__all__ = ["EMA", "BatchLogs", "Callback", "CallbackList", "EarlyStopping", "FreezeBackbone", "History", "Phase",
           "ProgressBar", "TensorBoardLogger", "TerminateOnNaN", "TimeBudget", "TrainState", "WeightSelection",
           "show_order"]
