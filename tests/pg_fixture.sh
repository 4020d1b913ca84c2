#!/usr/bin/env bash
# Starts or stops a throw-away PostgreSQL server for the test suite.
# usage: pg_fixture.sh start|stop DIR
# The server listens only on a unix socket in DIR (no TCP port to collide
# with), runs as the postgres user (PostgreSQL refuses root), and gets a
# database tailcoat_test. Tests reach it through TC_TEST_PG_URL.
set -euo pipefail
cmd=$1 dir=$2
bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
[ -x "$bindir/initdb" ] || { echo "pg_fixture: PostgreSQL server binaries not found (apt-get install postgresql)"; exit 1; }
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
case $cmd in
start)
  if [ -f "$dir/data/postmaster.pid" ]; then as_pg "$bindir/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true; fi
  rm -rf "$dir"
  mkdir -p "$dir"
  [ "$(id -u)" = 0 ] && chown postgres "$dir"
  as_pg "$bindir/initdb" -D "$dir/data" -A trust -U postgres --no-sync >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log"; exit 1; }
  as_pg "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-k $dir -c listen_addresses= -c fsync=off -c max_connections=300" start >/dev/null \
    || { cat "$dir/server.log"; exit 1; }
  as_pg "$bindir/createdb" -h "$dir" -U postgres tailcoat_test
  echo "postgres ready in $dir"
  ;;
stop)
  if [ -d "$dir/data" ]; then as_pg "$bindir/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true; fi
  echo "postgres stopped"
  ;;
*) echo "usage: $0 start|stop DIR"; exit 2 ;;
esac
