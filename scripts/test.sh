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
# Prometheus and promtool for tests/test_prometheus.py (Debian's package). The tests run
# their own server on a free port: the package's service must not start. A policy-rc.d
# answering 101 ("action forbidden") makes the postinst's invoke-rc.d/deb-systemd-invoke
# skip the start; ours is removed afterwards if the machine had none.
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    (
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            trap 'rm -f /usr/sbin/policy-rc.d' EXIT
            printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        fi
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    )
    # Not at boot either; and stopped (by its own pid file) if a policy-rc.d of the machine's
    # let the postinst start it.
    if [ -d /run/systemd/system ]; then
        systemctl disable --now --quiet prometheus.service || true
    else
        update-rc.d prometheus disable >/dev/null 2>&1 || true
        /etc/init.d/prometheus stop >/dev/null 2>&1 || true
    fi
fi
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test]'
set +e
"$VENV/bin/pytest" -q --durations=15 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure here" >&2
    exit 1
fi
exit "$rc"
