"""The parser classes the ``cnnlab`` grammar is built from: no abbreviations, errors as one line
with exit code 2 (from rank 0 alone), help wrapped to the terminal without splitting option names.
Nothing here imports torch."""
from __future__ import annotations

import argparse
import textwrap

from . import launch


class Formatter(argparse.HelpFormatter):
    """Descriptions wrapped to the terminal's width; examples (text with line breaks) as written."""

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return "\n".join(self._split_lines(text, width - len(indent), indent))

    def _split_lines(self, text, width, indent=""):  # never at a hyphen: option and file names stay whole
        return textwrap.wrap(" ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that takes no abbreviations (``--epoch`` is an error, not ``--epochs``) and
    whose errors are one line and exit code 2 (printed by rank 0 alone)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        launch.leave_the_report_to_rank0()
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n" if launch.MAIN_RANK else None)


class CommandParser(Parser):
    """A subcommand's parser: an argument it does not know is its own error (pointing at `cnnlab
    train --help`, say), and it may end a parse with a check of its own, ``finish(parser, namespace)``."""
    finish = None

    def parse_known_args(self, args=None, namespace=None):
        namespace, rest = super().parse_known_args(args, namespace)
        if rest:
            self.error(f"unrecognized arguments: {' '.join(rest)}")
        if self.finish is not None:
            self.finish(self, namespace)
        return namespace, rest

