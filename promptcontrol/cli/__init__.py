"""The command line: ``promptcontrol inspect | generate | edit | evaluate | sweep`` (also ``python -m promptcontrol``).

The rooms: :mod:`.args` (option types, :class:`CliError`, the one common option block), :mod:`.commands`
(inspect, generate, edit, evaluate), :mod:`.sweep_command` (the sweep's parser; the work is in
:mod:`promptcontrol.sweep`), :mod:`.entry` (the commands table and the entry point).
"""

from .args import EXIT_BAD_INPUT, CliError, parse_size
from .entry import COMMANDS, DELEGATED, build_parser, main

__all__ = ["main", "build_parser", "COMMANDS", "DELEGATED", "CliError", "EXIT_BAD_INPUT", "parse_size"]
