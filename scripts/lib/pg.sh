# shellcheck shell=bash
# A throwaway PostgreSQL cluster for the benchmark scripts. Sourced, not run.
#
#   pg_find_bin [TOOL...]  sets pg_bin to the newest /usr/lib/postgresql/*/bin
#                          (initdb plus TOOLs must be there); fails when none
#   pg_prepare DIR         makes DIR (the cluster's home) and, when run as root,
#                          hands it to `nobody`, who runs the cluster; sets
#                          pgdir and as_pg (the command prefix to run as that user)
#   pg_start MAX_CONNECTIONS
#                          initdb (superuser postgres, trust auth) and start on
#                          127.0.0.1 and a free port, TCP only, with fsync,
#                          synchronous_commit and full_page_writes on (the
#                          defaults, spelled out); sets pg_port. On failure it
#                          prints the log and calls the caller's `die`
#   pg_stop                fast shutdown, if it runs
#   pg_version             e.g. 15.18
#   psql_ ARGS...          psql as postgres on the cluster, stopping on errors
#   free_port              a free TCP port on 127.0.0.1 (python3)
#
# The caller defines `die` and removes DIR when it is done.

pg_bin=''
pgdir=''
pg_port=''
as_pg=()

pg_find_bin() {
  local tool
  pg_bin=$(compgen -G '/usr/lib/postgresql/*/bin' | sort -V | tail -n 1 || true)
  [[ -n $pg_bin && -x $pg_bin/initdb ]] || return 1
  for tool in "$@"; do
    [[ -x $pg_bin/$tool ]] || return 1
  done
}

pg_prepare() {
  pgdir=$1
  mkdir -p "$pgdir"
  as_pg=()
  if [[ $(id -u) -eq 0 ]]; then
    chown nobody "$pgdir"
    as_pg=(runuser -u nobody --)
  fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pg_version() {
  "$pg_bin/postgres" --version | awk '{print $3}'
}

pg_start() {
  local max_connections=$1
  "${as_pg[@]}" "$pg_bin/initdb" -D "$pgdir/data" -U postgres --auth=trust -E UTF8 --no-locale \
    >"$pgdir/initdb.log" 2>&1 || { cat "$pgdir/initdb.log" >&2; die "initdb failed"; }
  pg_port=$(free_port)
  # Durable settings are the defaults; spelled out so reports can say so.
  "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$pgdir/data" -l "$pgdir/postgres.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -c port=$pg_port -c unix_socket_directories='' \
        -c fsync=on -c synchronous_commit=on -c full_page_writes=on \
        -c max_connections=$max_connections" \
    start >/dev/null || { cat "$pgdir/postgres.log" >&2; die "PostgreSQL did not start"; }
}

pg_stop() {
  if [[ -n $pgdir && -f $pgdir/data/postmaster.pid ]]; then
    "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$pgdir/data" -m fast -w stop >/dev/null 2>&1
  fi
}

psql_() { "$pg_bin/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$pg_port" -U postgres "$@"; }
