"""Run one fuzz target under atheris (coverage-guided, libFuzzer's engine).

    python -m tests.fuzz TARGET [libFuzzer options] [CORPUS_DIR ...]

TARGET is one of ``tests.fuzz.targets.TARGETS``. With no corpus directory given, the target's
seed corpus in the repository (``tests/fuzz/corpus/TARGET``) is read and new inputs go to a
scratch directory, so a long run never writes into the tree. Crashes are written as
``crash-*`` files in the current directory (``-artifact_prefix=`` moves them). See README
"Fuzzing" for the long run.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

CORPUS = Path(__file__).parent / "corpus"


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    target, args = sys.argv[1], sys.argv[2:]
    with atheris.instrument_imports(include=["pgproxy"]):
        from tests.fuzz.targets import TARGETS, warm_up
    if target not in TARGETS:
        sys.exit(f"unknown target {target!r}: choose from {', '.join(TARGETS)}")
    warm_up(target)
    if not [a for a in args if not a.startswith("-")]:
        scratch = tempfile.mkdtemp(prefix=f"pgproxy-fuzz-{target}-")
        args += [scratch, str(CORPUS / target)]
    atheris.Setup([sys.argv[0], *args], TARGETS[target])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
