#!/usr/bin/env bash
# Install the TimescaleDB extension (Apache-licensed part) into the running
# PostgreSQL cluster and preload it. Idempotent: a quick no-op when done already.
#
# Debian 12 ships no TimescaleDB package, but Debian 13's (trixie) source
# package builds fine against PostgreSQL 15, so we fetch that source through a
# private apt configuration (the machine's own apt sources stay untouched) and
# build it locally. Must run as root. Connection: PGHOST/PGPORT/PGUSER, default
# 127.0.0.1:5432 as postgres (trust auth).
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
export PGHOST="${PGHOST:-127.0.0.1}" PGPORT="${PGPORT:-5432}" PGUSER="${PGUSER:-postgres}"
CLUSTER="${PG_CLUSTER:-main}"
VERIFY_DB="${VERIFY_DB:-test}"

STEP="start"
step() { STEP="$*"; echo "install_timescaledb: $*"; }
trap 'echo "install_timescaledb: FAILED during: $STEP" >&2' ERR
sql() { psql -XAtq -d postgres -c "$1"; }

step "checking the running PostgreSQL server"
VERSION_NUM=$(sql 'SHOW server_version_num')  # plain assignment so set -e sees a failure
MAJOR=$((VERSION_NUM / 10000))
available() { [ "$(sql "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'")" = 1 ]; }
preloaded() { [[ "$(sql 'SHOW shared_preload_libraries')" == *timescaledb* ]]; }

if available && preloaded; then
    echo "install_timescaledb: already installed and preloaded in PostgreSQL $MAJOR; nothing to do"
    exit 0
fi

if ! available; then
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT

    step "installing build dependencies"
    # dpkg-dev (dpkg-source) and build-essential are normally present already;
    # listed so a leaner machine still works. Retry after an update in case the
    # machine's package lists are stale or missing.
    PKGS=(postgresql-server-dev-"$MAJOR" cmake libssl-dev dpkg-dev build-essential)
    apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null ||
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null; }

    step "finding the Debian mirror in the machine's apt sources"
    CODENAME=$(. /etc/os-release && echo "$VERSION_CODENAME")
    MIRROR=$( {
        # one-line format: deb [options] URI SUITE COMPONENT...
        cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
            sed -E 's/\[[^]]*\]//' | awk -v c="$CODENAME" '$1 == "deb" && $3 == c { print $2 }'
        # deb822 format: paragraphs with "URIs:" and "Suites:" fields
        cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk -v c="$CODENAME" '
            BEGIN { RS = "" }
            { uri = ""; ok = 0; n = split($0, l, "\n")
              for (i = 1; i <= n; i++) {
                  if (l[i] ~ /^URIs:/) { split(l[i], u, /[ \t]+/); uri = u[2] }
                  if (l[i] ~ /^Suites:/ && (l[i] " ") ~ ("[ \t]" c "[ \t]")) ok = 1
                  if (l[i] ~ /^Enabled:[ \t]*no/) ok = -1 }
              if (ok == 1 && uri != "") print uri }'
    } | head -n1 )
    [ -n "$MIRROR" ] || { echo "install_timescaledb: no '$CODENAME' mirror found in /etc/apt sources" >&2; false; }
    echo "install_timescaledb: using mirror $MIRROR"

    step "fetching the trixie timescaledb source package"
    # Private apt config: only a trixie deb-src line, with its own lists dir, so
    # the machine's sources and package lists are not changed. Sandbox user root:
    # the _apt user cannot write into our mode-700 temp dir.
    mkdir -p "$WORK/lists/partial"
    echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR trixie main" >"$WORK/sources.list"
    APT_OPTS=(-qq -o Dir::Etc::SourceList="$WORK/sources.list" -o Dir::Etc::SourceParts=/dev/null
              -o Dir::State::Lists="$WORK/lists" -o APT::Sandbox::User=root)
    apt-get "${APT_OPTS[@]}" update
    (cd "$WORK" && apt-get "${APT_OPTS[@]}" source timescaledb >/dev/null)
    SRC=$(find "$WORK" -mindepth 1 -maxdepth 1 -type d -name 'timescaledb-*' | head -n1)
    [ -n "$SRC" ] || { echo "install_timescaledb: source package did not unpack" >&2; false; }

    step "building and installing $(basename "$SRC") for PostgreSQL $MAJOR"
    # Apache-licensed part only (as Debian ships it); no tests; telemetry off
    # because CI machines have no internet.
    (cd "$SRC" && ./bootstrap -DAPACHE_ONLY=1 -DREGRESS_CHECKS=OFF -DTAP_CHECKS=OFF \
        -DWARNINGS_AS_ERRORS=OFF -DSEND_TELEMETRY_DEFAULT=OFF \
        -DPG_CONFIG="/usr/lib/postgresql/$MAJOR/bin/pg_config" >"$WORK/bootstrap.log" 2>&1 \
        || { tail -n 30 "$WORK/bootstrap.log" >&2; false; })
    make -s -C "$SRC/build" -j"$(nproc)" install >"$WORK/make.log" 2>&1 \
        || { tail -n 30 "$WORK/make.log" >&2; false; }
    available || { echo "install_timescaledb: timescaledb still not in pg_available_extensions" >&2; false; }
fi

if ! preloaded; then
    step "preloading timescaledb and restarting cluster $MAJOR/$CLUSTER"
    # Keep any libraries already preloaded; our conf.d file overrides the setting.
    CURRENT=$(sql 'SHOW shared_preload_libraries')
    echo "shared_preload_libraries = '${CURRENT:+$CURRENT,}timescaledb'" \
        >"/etc/postgresql/$MAJOR/$CLUSTER/conf.d/timescaledb.conf"
    pg_ctlcluster --skip-systemctl-redirect "$MAJOR" "$CLUSTER" restart
    for _ in $(seq 60); do pg_isready -q -d postgres && break; sleep 1; done
    pg_isready -q -d postgres || { echo "install_timescaledb: server not ready after restart" >&2; false; }
    preloaded || { echo "install_timescaledb: timescaledb not in shared_preload_libraries after restart" >&2; false; }
fi

step "verifying CREATE EXTENSION in database $VERIFY_DB"
# Drop it again afterwards (only if we created it) so the project's migrations
# create the extension themselves; the library stays installed and preloaded.
EXISTED=$(psql -XAtq -d "$VERIFY_DB" -c "SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'")
psql -X -v ON_ERROR_STOP=1 -d "$VERIFY_DB" -c 'SET client_min_messages = warning' \
    -c 'CREATE EXTENSION IF NOT EXISTS timescaledb' \
    -c "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'" \
    -c 'SHOW timescaledb.license'
LICENSE=$(psql -XAtq -d "$VERIFY_DB" -c 'SHOW timescaledb.license')
[ "$LICENSE" = apache ] || { echo "install_timescaledb: expected license 'apache', got '$LICENSE'" >&2; false; }
[ "$EXISTED" = 1 ] || psql -XAtq -v ON_ERROR_STOP=1 -d "$VERIFY_DB" -c 'DROP EXTENSION timescaledb'
echo "install_timescaledb: done"
