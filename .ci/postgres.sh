#!/usr/bin/env bash
# PostgreSQL for tests/test_sweep_postgres.py. Installs Debian's postgresql package if it is
# missing, starts a throwaway cluster on 127.0.0.1 (its own folder and port, trust auth, nothing
# to clean up but the folder), creates the database imgclf_test and prints the one line to eval:
#   eval "$(bash .ci/postgres.sh)"
# Everything else goes to stderr. Running it again reuses the running cluster.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PGDIR="${IMGCLF_PG_DIR:-/tmp/imgclf-postgres}"
PORT="${IMGCLF_PG_PORT:-55432}"
DB=imgclf_test
ROLE=imgclf

{
  apt_get() {
    # another process may hold apt's lock: wait for it rather than fail
    for _ in $(seq 1 30); do
      if apt-get -o DPkg::Lock::Timeout=120 "$@"; then return 0; fi
      echo "apt-get $* failed; retrying in 10 s" ; sleep 10
    done
    return 1
  }
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt_get update
    apt_get install -y --no-install-recommends postgresql
  fi
  BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"

  # initdb refuses to run as root: as root, run the server as the package's postgres user
  if [ "$(id -u)" = 0 ]; then
    as_pg() { runuser -u postgres -- "$@"; }
  else
    as_pg() { "$@"; }
  fi
  if ! as_pg "$BIN/pg_ctl" -D "$PGDIR/data" status >/dev/null 2>&1; then
    rm -rf "$PGDIR"
    mkdir -p "$PGDIR"
    [ "$(id -u)" = 0 ] && chown postgres: "$PGDIR"
    as_pg "$BIN/initdb" -D "$PGDIR/data" -U postgres --auth=trust -E UTF8 >/dev/null
    as_pg "$BIN/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/server.log" -w \
      -o "-c listen_addresses=127.0.0.1 -p $PORT -k $PGDIR -c max_connections=200" start
  fi
  PSQL=(psql -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -tA)
  "${PSQL[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname='$ROLE'" | grep -q 1 \
    || "${PSQL[@]}" -c "CREATE ROLE $ROLE LOGIN"
  "${PSQL[@]}" -c "SELECT 1 FROM pg_database WHERE datname='$DB'" | grep -q 1 \
    || "${PSQL[@]}" -c "CREATE DATABASE $DB OWNER $ROLE"

  # the driver SQLAlchemy uses for postgresql:// URLs
  PY="$ROOT/.venv/bin/python"
  [ -x "$PY" ] || PY="$(command -v python3)"
  "$PY" -c "import psycopg2" 2>/dev/null || "$PY" -m pip install -q psycopg2-binary
} >&2

echo "export IMGCLF_TEST_POSTGRES_URL=postgresql://$ROLE@127.0.0.1:$PORT/$DB"
