"""The one exception the CLI turns into a one-line message and exit code 2."""


class CnnlabError(Exception):
    """A problem with the user's input: the message names it and says the fix."""
