#!/usr/bin/env bash
# The project's test command: a fresh virtualenv with the test extras, then pytest.
# Used as-is by .ci/run; safe to run on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
# The database tests run on both backends: the machine's PostgreSQL with TimescaleDB
# (installed here, a quick no-op once done) and an embedded plain PostgreSQL.
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start
fi
bash scripts/install_timescaledb.sh
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test]'
set +e
"$VENV/bin/pytest" -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure here" >&2
    exit 1
fi
exit "$rc"
