#!/usr/bin/env bash
# Mutation testing of lora/ and training/ against tests/lora and tests/training (not part of CI: a
# full run of its ~6700 mutants takes about an hour on 2 cores). mutmut (from the registry) changes
# the code one small edit at a time ("mutant": a flipped comparison, a changed constant, a dropped
# call) and runs the tests that reach the changed function; a mutant the tests do not notice
# "survives". Configuration: [tool.mutmut] in pyproject.toml. The work happens in ./mutants/
# (ignored); a second run continues where the first stopped. Mutants given by name run again.
#   bash scripts/mutation.sh              run (or continue), then print the counts
#   bash scripts/mutation.sh 'training.data.*'   run (again) only the mutants matching these names
#   bash scripts/mutation.sh --results    only print the counts and the surviving mutants
#   .venv/bin/mutmut show <mutant>        the edit a mutant makes
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MUTMUT_VERSION="3.8.1"
bash scripts/setup.sh --test
if ! .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('mutmut') != '$MUTMUT_VERSION')" 2>/dev/null; then
    .venv/bin/python -m pip install --disable-pip-version-check -q "mutmut==$MUTMUT_VERSION"
fi
# The ComfyUI parity tests of tests/lora look for ComfyUI beside the tests.
mkdir -p mutants
ln -sfn "$ROOT/.comfyui" mutants/.comfyui
if [[ "${1:-}" != "--results" ]]; then
    # Which tests reach which function, collected again every run: mutmut 3.8.1, finding tests added
    # since the last run, collects them alone and forgets every other test's functions (most mutants
    # then show as "no tests"). Results of unchanged functions are kept either way.
    rm -f mutants/mutmut-stats.json
    # One thread per forked child: a child forked from a process that has started torch's OpenMP pool
    # can hang in its first parallel op (a "timeout" that is no detection), and 2 children x 2 threads
    # on 2 cores only contend. The console script, not `python -m mutmut`: its trampolines import
    # mutmut.__main__.
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/mutmut run --max-children "${MUTATION_JOBS:-2}" "$@" || true
fi
.venv/bin/mutmut export-cicd-stats >/dev/null 2>&1 || true
.venv/bin/python - <<'PY'
import json, pathlib
stats = json.loads(pathlib.Path("mutants/mutmut-cicd-stats.json").read_text())
killed, survived = stats.get("killed", 0), stats.get("survived", 0)
tested = killed + survived + stats.get("timeout", 0) + stats.get("suspicious", 0)
print(json.dumps(stats, indent=1))
if tested:
    print(f"kill rate: {(tested - survived) / tested:.1%} of {tested} tested mutants "
          f"({survived} survived; {stats.get('no_tests', 0)} reached by no test, {stats.get('skipped', 0)} skipped)")
PY
.venv/bin/mutmut results 2>/dev/null | grep -E "survived" | sed 's/^ */survived: /' | head -400 || true
