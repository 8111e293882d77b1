#!/usr/bin/env bash
# Services the tests need, sourced by .ci/run before `make test` (or by hand: `source .ci/services.sh`).
# Starts a throwaway PostgreSQL cluster (Debian packages) on 127.0.0.1 and exports
# INSTRUCTFLOW_TEST_POSTGRES_URI for tests/test_mlflow_server.py.
# Sourced, so no `set -e` here: a failure is reported and the function returns non-zero.

_instructflow_start_postgres() {
  local bindir initdb
  initdb=$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$initdb" ]; then
    echo "services: installing postgresql (Debian packages)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq postgresql >/dev/null || return 1
    initdb=$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1)
    [ -n "$initdb" ] || { echo "services: initdb not found after install" >&2; return 1; }
  fi
  bindir=$(dirname "$initdb")

  # initdb refuses to run as root: the cluster belongs to the postgres user.
  local runas=()
  if [ "$(id -u)" = "0" ]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres || return 1
    runas=(runuser -u postgres --)
  fi

  local dir port
  dir=$(mktemp -d /tmp/instructflow-pg.XXXXXX)
  chmod 755 "$dir"
  [ "$(id -u)" = "0" ] && chown postgres: "$dir"
  # A free port, chosen by the kernel.
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

  "${runas[@]}" "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; return 1; }
  # Listen on 127.0.0.1 only; the unix socket lives in the cluster dir (no /run/postgresql needed).
  "${runas[@]}" "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $dir" start >/dev/null \
    || { cat "$dir/server.log" >&2; return 1; }
  "${runas[@]}" "$bindir/createdb" -h 127.0.0.1 -p "$port" -U postgres instructflow_test \
    || return 1

  export INSTRUCTFLOW_TEST_POSTGRES_URI="postgresql://postgres@127.0.0.1:$port/instructflow_test"
  export INSTRUCTFLOW_TEST_POSTGRES_DIR="$dir"
  echo "services: PostgreSQL at $INSTRUCTFLOW_TEST_POSTGRES_URI (stop: $bindir/pg_ctl -D $dir/data stop)" >&2
}

_instructflow_stop_postgres() {
  [ -n "${INSTRUCTFLOW_TEST_POSTGRES_DIR:-}" ] || return 0
  local pg_ctl
  pg_ctl=$(ls /usr/lib/postgresql/*/bin/pg_ctl 2>/dev/null | sort -V | tail -n 1)
  if [ "$(id -u)" = "0" ]; then
    runuser -u postgres -- "$pg_ctl" -D "$INSTRUCTFLOW_TEST_POSTGRES_DIR/data" -m fast stop >/dev/null 2>&1 || true
  else
    "$pg_ctl" -D "$INSTRUCTFLOW_TEST_POSTGRES_DIR/data" -m fast stop >/dev/null 2>&1 || true
  fi
  rm -rf "$INSTRUCTFLOW_TEST_POSTGRES_DIR" || true
}

_instructflow_start_postgres || echo "services: PostgreSQL not started; its tests will be skipped" >&2
# The cluster goes when the shell that sourced this exits (.ci/run), pass or fail.
trap _instructflow_stop_postgres EXIT
