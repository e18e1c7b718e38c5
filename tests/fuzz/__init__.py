"""lora-inspect's own contract fuzzer (issue 9): mutated adapters through every command, in subprocesses.

Run from the repository root: ``python -m tests.fuzz --seed 0 --n 200 --out reports/fuzz.md``
(``--help`` for the options). Importable: :func:`run_fuzz` with a :class:`Config`.
"""

from .core import Config, InputResult, Result, fuzz_one, run_fuzz
from .mutations import FAMILIES, Mutated, mutate
from .runner import COMMANDS, QUICK, Break, Run, execute, judge
from .seeds import Seed, make_seeds
from .summary import break_classes, markdown

__all__ = ["Config", "InputResult", "Result", "fuzz_one", "run_fuzz", "FAMILIES", "Mutated", "mutate", "COMMANDS",
           "QUICK", "Break", "Run", "execute", "judge", "Seed", "make_seeds", "break_classes", "markdown"]
