"""The exceptions the CLI turns into one line and an exit code."""


class CnnlabError(Exception):
    """A problem with the user's input: the message names it and says the fix (exit code 2)."""


class RunInterrupted(CnnlabError):
    """A run stopped by signal ``signum`` at the end of batch ``batch`` of ``batches`` in epoch
    ``epoch`` (0: a transfer run's feature extraction); the last epoch's checkpoint stands. The
    loop raises it bare; ``interrupts.guarded_run`` raises it again with the message saying how to
    continue. ``exit_code`` is 128 + the signal number: 130 for SIGINT, 143 for SIGTERM, 138 for SIGUSR1
    (Slurm's warning before a job's end, requeued or not)."""

    def __init__(self, signum: int, epoch: int, batch: int, batches: int, message: str | None = None):
        super().__init__(message or f"signal {signum}")
        self.signum, self.epoch, self.batch, self.batches = signum, epoch, batch, batches
        self.exit_code = 128 + signum
