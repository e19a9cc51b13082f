"""The fuzz targets in the test command: every committed input replayed (fast), then a
short coverage-guided run of each target with atheris (FUZZ_SECONDS in all, at most 60).

A crash found here fails the test and names the input file; docs/fuzzing.md says how to
keep it as a regression vector. A target whose code is not there yet is skipped, saying so.
"""

from __future__ import annotations

import traceback

import pytest

from tests.fuzz import targets
from tests.fuzz.__main__ import fuzz, replay

FUZZ_SECONDS = 48
PER_TARGET = max(1, FUZZ_SECONDS // len(targets.TARGETS))


@pytest.mark.parametrize("name", list(targets.TARGETS))
def test_replay_corpus(name):
    if not targets.corpus_files(name):
        pytest.fail(f"no committed inputs in tests/fuzz/corpus/{name}/")
    outcome = replay(name)
    if outcome.skipped:
        pytest.skip(outcome.skipped)
    assert not outcome.failures, "\n".join(outcome.failures)


def _replayed(name: str, crashes: list) -> str:
    """Each crashing input run again in this process: its exception and traceback (the
    input itself lives only in pytest's temporary directory)."""
    out = []
    for path in crashes:
        data = path.read_bytes()
        try:
            targets.load(name)(data)
        except BaseException:  # whatever the target raised is the finding
            out.append(f"input {data!r}:\n{traceback.format_exc()}")
        else:
            out.append(f"input {data!r}: no exception when replayed")
    return "\n".join(out)


@pytest.mark.parametrize("name", list(targets.TARGETS))
def test_fuzz_briefly(name, tmp_path):
    outcome = fuzz(name, PER_TARGET, crashes=tmp_path)
    if outcome.skipped:
        pytest.skip(outcome.skipped)
    tail = "\n".join(outcome.log.strip().splitlines()[-30:])
    assert not outcome.crashes, (
        f"fuzz target {name} crashed; keep the input as a regression vector: "
        f"cp {' '.join(map(str, outcome.crashes))} tests/fuzz/corpus/{name}/\n"
        f"{_replayed(name, outcome.crashes)}\n{tail}"
    )
    assert not outcome.failures, f"{outcome.failures}\n{tail}"
    assert "Done " in outcome.log, tail  # libFuzzer's closing line: it really ran
