"""The exceptions the CLI turns into one line and an exit code."""


class CnnlabError(Exception):
    """A problem with the user's input: the message names it and says the fix (exit code 2)."""


class RunInterrupted(CnnlabError):
    """A run stopped by a signal; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
