"""Run the fuzz targets (docs/fuzzing.md).

    python -m tests.fuzz run --seconds N [--crashes DIR] [--keep-corpus] [TARGET ...]
    python -m tests.fuzz replay [TARGET ...]
    python -m tests.fuzz list

``run`` fuzzes each target (all by default) for N seconds in its own atheris process,
starting from ``tests/fuzz/corpus/<target>/``; a crashing input is written to
``--crashes`` (default: that corpus directory, so it stays as a regression vector).
``--keep-corpus`` also adds the new interesting inputs to the committed corpus.
``replay`` runs every committed input through its target, without atheris.
A target whose code cannot be imported (not merged yet) is skipped with a message.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.fuzz import targets

REPO_ROOT = Path(__file__).resolve().parents[2]
DICTS = Path(__file__).parent / "dicts"
LIBFUZZER_OPTIONS = ("-timeout=30", "-rss_limit_mb=2048", "-max_len=4096", "-print_final_stats=1")


@dataclass
class Outcome:
    """What one target's run or replay found."""

    target: str
    skipped: str | None = None
    failures: list[str] = field(default_factory=list)
    crashes: list[Path] = field(default_factory=list)
    log: str = ""

    @property
    def ok(self) -> bool:
        return not self.failures and not self.crashes


def replay(name: str) -> Outcome:
    """Every committed input of ``name`` through the target, in this process."""
    outcome = Outcome(name)
    try:
        target = targets.load(name)
    except targets.TargetUnavailable as e:
        outcome.skipped = str(e)
        return outcome
    for path in targets.corpus_files(name):
        try:
            target(path.read_bytes())
        except Exception as e:  # any exception is a finding: report them all
            outcome.failures.append(f"{path.relative_to(REPO_ROOT)}: {type(e).__name__}: {e}")
    return outcome


def fuzz(
    name: str,
    seconds: int,
    crashes: Path | None = None,
    keep_corpus: bool = False,
    python: str = sys.executable,
) -> Outcome:
    """Fuzz ``name`` for ``seconds`` in an atheris subprocess."""
    outcome = Outcome(name)
    try:
        targets.load(name)
    except targets.TargetUnavailable as e:
        outcome.skipped = str(e)
        return outcome
    seeds = targets.CORPUS / name
    seeds.mkdir(parents=True, exist_ok=True)
    crashes = crashes if crashes is not None else seeds
    crashes.mkdir(parents=True, exist_ok=True)
    before = set(crashes.iterdir())
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as work:
        # libFuzzer writes new inputs into the first directory only.
        dirs = [str(seeds)] if keep_corpus else [work, str(seeds)]
        argv = [
            python,
            "-m",
            "tests.fuzz",
            "worker",
            name,
            *dirs,
            *LIBFUZZER_OPTIONS,
            f"-max_total_time={seconds}",
            f"-artifact_prefix={crashes}/",
        ]
        dictionary = DICTS / f"{name}.dict"
        if dictionary.exists():
            argv.append(f"-dict={dictionary}")
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        # One stream, in order: atheris prints an uncaught exception's traceback on stdout
        # just before libFuzzer's crash lines on stderr.
        done = subprocess.run(
            argv,
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=seconds * 3 + 120,
        )
    outcome.log = done.stdout
    outcome.crashes = sorted(set(crashes.iterdir()) - before)
    if done.returncode != 0 and not outcome.crashes:
        outcome.failures.append(f"atheris exited {done.returncode}")
    return outcome


def _worker(name: str, libfuzzer_args: list[str]) -> None:
    import atheris

    # Coverage comes from cpvm's own bytecode: instrument it as the target imports it.
    with atheris.instrument_imports(include=["cpvm"]):
        target = targets.load(name)
    atheris.Setup([sys.argv[0], *libfuzzer_args], target)
    atheris.Fuzz()


def _report(outcome: Outcome) -> bool:
    if outcome.skipped:
        print(f"SKIP {outcome.target}: {outcome.skipped}")
        return True
    if outcome.ok:
        print(f"ok   {outcome.target}")
        return True
    print(f"FAIL {outcome.target}")
    for line in outcome.failures:
        print(f"     {line}")
    for path in outcome.crashes:
        print(f"     crash input kept: {path}")
    if outcome.log:
        print("     " + "\n     ".join(outcome.log.strip().splitlines()[-40:]))
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fuzz",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="coverage-guided fuzzing")
    run_p.add_argument("--seconds", type=int, required=True, help="per target")
    run_p.add_argument("--crashes", type=Path, help="where crash inputs go (default: corpus)")
    run_p.add_argument("--keep-corpus", action="store_true", help="keep new inputs too")
    run_p.add_argument("target", nargs="*", help="default: all")
    replay_p = sub.add_parser("replay", help="run the committed inputs")
    replay_p.add_argument("target", nargs="*", help="default: all")
    sub.add_parser("list", help="the targets")
    worker_p = sub.add_parser("worker", help=argparse.SUPPRESS)
    worker_p.add_argument("target", choices=targets.TARGETS)
    worker_p.add_argument("libfuzzer_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "worker":
        _worker(args.target, args.libfuzzer_args)
        return 0
    if args.command == "list":
        for name, where in targets.TARGETS.items():
            print(f"{name:15} {where}")
        return 0
    names = args.target or list(targets.TARGETS)
    unknown = [n for n in names if n not in targets.TARGETS]
    if unknown:
        parser.error(f"unknown targets {unknown}; known: {', '.join(targets.TARGETS)}")
    ok = True
    for name in names:
        if args.command == "run":
            crashes = args.crashes / name if args.crashes else None
            ok &= _report(fuzz(name, args.seconds, crashes, args.keep_corpus))
        else:
            ok &= _report(replay(name))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
