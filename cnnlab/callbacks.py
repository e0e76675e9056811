"""What a callback is: the three moments of training it hears of, and how it stops training.
Early stopping, TensorBoard and MLflow are callbacks; so is anything passed as ``callbacks=[...]``
to ``cnnlab.train`` or ``cnnlab.transfer``. Any object with some of these methods will do: the
loop calls only those it has."""
from __future__ import annotations


class Callback:
    """The protocol, with methods that do nothing: subclass it and override what you need.

    * ``on_train_begin(run)``: before the first epoch of a phase (a transfer run trains its head,
      then fine-tunes: two phases). ``run`` is the run's state: ``run.model``, ``run.optimizer``,
      ``run.history`` (a dict per epoch so far), ``run.epoch`` (the last finished, 0 at the start).
    * ``on_epoch_end(epoch, logs)``: after each epoch (from 1); ``logs`` is the epoch's row of
      history.csv (loss, accuracy, val_loss, val_accuracy, ..., lr, seconds). Return True to stop
      training after this epoch: the run then tests and writes its results as after its last epoch.
    * ``on_train_end(logs)``: after the last epoch of a phase, with the last epoch's row (empty when
      no epoch ran).
    * ``on_run_end(run_dir, metrics)``: once the run's folder is complete (test scores in
      ``metrics``, the files written).

    Callbacks run on every rank under torchrun; a logger writes on rank 0 only
    (``cnnlab.distributed.is_main()``)."""

    def on_train_begin(self, run) -> None:
        pass

    def on_epoch_end(self, epoch: int, logs: dict) -> bool | None:
        return None

    def on_train_end(self, logs: dict) -> None:
        pass

    def on_run_end(self, run_dir, metrics: dict) -> None:
        pass


class CallbackList:
    """Calls each of ``callbacks`` in order; an object lacking a method is skipped for it."""

    def __init__(self, callbacks):
        self.callbacks = [c for c in callbacks if c is not None]

    def _each(self, method: str, *args) -> list:
        return [getattr(c, method)(*args) for c in self.callbacks if callable(getattr(c, method, None))]

    def on_train_begin(self, run) -> None:
        self._each("on_train_begin", run)

    def on_epoch_end(self, epoch: int, logs: dict) -> bool:
        """True when any callback asks to stop (every one still hears of the epoch)."""
        return any(bool(answer) for answer in self._each("on_epoch_end", epoch, logs))

    def on_train_end(self, logs: dict) -> None:
        self._each("on_train_end", logs)

    def on_run_end(self, run_dir, metrics: dict) -> None:
        self._each("on_run_end", run_dir, metrics)
