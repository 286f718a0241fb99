# shellcheck shell=bash
# Shared helpers for scripts/run, scripts/test and scripts/bench. Source it, don't run it:
#
#   source "$(dirname "$0")/pg.sh"
#   ensure_postgres      # DATABASE_URL (given, or a throwaway local cluster) + PG_HOSTPORT
#   apply_schema [URL]   # schema/schema.sql into URL (default: $DATABASE_URL)
#
# Environment:
#   DATABASE_URL   use this PostgreSQL instead of starting one (postgres://user:pass@host:port/db)
#   PG_HOSTPORT    host:port of DATABASE_URL; derived from it when unset
#   PG_KEEP=1      leave the throwaway cluster running on exit (prints how to stop it)
#   PG_PORT        port for the throwaway cluster (default: a free one the kernel picks)
#
# Exit hooks: `on_exit 'command'` registers cleanup; hooks run in reverse order on EXIT,
# and INT/TERM are turned into an exit so that they run on Ctrl-C and kill too.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export REPO_ROOT

_SB_EXIT_HOOKS=()

_sb_run_exit_hooks() {
  local i
  for ((i = ${#_SB_EXIT_HOOKS[@]} - 1; i >= 0; i--)); do
    eval "${_SB_EXIT_HOOKS[i]}" || true
  done
  _SB_EXIT_HOOKS=()
}

on_exit() {
  _SB_EXIT_HOOKS+=("$1")
  trap _sb_run_exit_hooks EXIT
}

trap 'exit 130' INT
trap 'exit 143' TERM

log() { printf '==> %s\n' "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

is_root() { [[ "$(id -u)" == 0 ]]; }

# apt-get install the given Debian packages (root only; a no-op for packages already there).
apt_install() {
  is_root || die "need Debian packages: $* (run as root, or install them yourself)"
  command -v apt-get >/dev/null || die "need packages: $* (and no apt-get here)"
  if [[ -z "${_SB_APT_UPDATED:-}" ]]; then
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null
    _SB_APT_UPDATED=1
  fi
  log "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" </dev/null >/dev/null
}

# Ensure the wasm32-wasip2 Rust target is installed (no network when it already is).
ensure_wasm_target() {
  if command -v rustup >/dev/null; then
    if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
      log "rustup target add wasm32-wasip2"
      rustup target add wasm32-wasip2
    fi
  fi
}

# host:port from a postgres:// URL (default port 5432).
url_hostport() {
  local rest="${1#*://}"
  rest="${rest%%/*}"
  rest="${rest%%\?*}"
  rest="${rest##*@}"
  if [[ "$rest" == \[*\]:* || ("$rest" != \[* && "$rest" == *:*) ]]; then
    printf '%s\n' "$rest"
  else
    printf '%s:5432\n' "$rest"
  fi
}

# Replace the database name in a postgres:// URL, keeping the query string.
url_with_db() {
  local url="$1" db="$2" query="" base
  if [[ "$url" == *\?* ]]; then query="?${url#*\?}"; fi
  base="${url%%\?*}"
  local scheme="${base%%://*}" rest="${base#*://}"
  rest="${rest%%/*}"
  printf '%s://%s/%s%s\n' "$scheme" "$rest" "$db" "$query"
}

# Newest /usr/lib/postgresql/<ver>/bin (Debian's layout), or nothing.
_pg_debian_bin() {
  local d
  for d in /usr/lib/postgresql/*/bin; do
    [[ -d "$d" ]] && printf '%s\n' "$d"
  done | sort -V | tail -n 1
}

# Directory with initdb/pg_ctl/postgres, installing Debian's postgresql when missing.
find_pg_bin() {
  local d
  d="$(_pg_debian_bin)"
  if [[ -n "$d" && -x "$d/initdb" && -x "$d/pg_ctl" ]]; then
    printf '%s\n' "$d"
    return
  fi
  if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
    dirname "$(readlink -f "$(command -v pg_ctl)")"
    return
  fi
  apt_install postgresql >&2
  d="$(_pg_debian_bin)"
  [[ -n "$d" && -x "$d/initdb" ]] || die "postgresql installed, but no initdb under /usr/lib/postgresql/*/bin"
  printf '%s\n' "$d"
}

# psql, installing postgresql-client when missing.
ensure_psql() {
  if command -v psql >/dev/null; then return; fi
  local d
  d="$(_pg_debian_bin)"
  if [[ -n "$d" && -x "$d/psql" ]]; then
    export PATH="$PATH:$d"
    return
  fi
  apt_install postgresql-client
}

free_port() {
  python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'
}

# Run a command as the cluster's owner: the `postgres` OS user when we are root (initdb
# refuses root), ourselves otherwise.
_pg_as_owner() {
  if is_root; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

_pg_stop() {
  [[ -n "${_SB_PG_DIR:-}" ]] || return 0
  if [[ -n "${PG_KEEP:-}" ]]; then
    log "PG_KEEP set: leaving PostgreSQL running at $DATABASE_URL"
    log "stop it with: ${_SB_PG_STOP_HINT}"
    return 0
  fi
  _pg_as_owner "$_SB_PG_BIN/pg_ctl" -D "$_SB_PG_DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$_SB_PG_DIR"
  _SB_PG_DIR=""
}

# Use $DATABASE_URL, or start a throwaway cluster on 127.0.0.1 and export DATABASE_URL.
# Either way exports PG_HOSTPORT (host:port, what spin.toml's allowed_outbound_hosts must allow).
ensure_postgres() {
  ensure_psql
  if [[ -n "${DATABASE_URL:-}" ]]; then
    export DATABASE_URL
    PG_HOSTPORT="${PG_HOSTPORT:-$(url_hostport "$DATABASE_URL")}"
    export PG_HOSTPORT
    log "using DATABASE_URL (host $PG_HOSTPORT)"
    return
  fi
  command -v python3 >/dev/null || apt_install python3

  _SB_PG_BIN="$(find_pg_bin)"
  if is_root; then
    if ! id postgres >/dev/null 2>&1; then
      log "creating the postgres OS user"
      useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin postgres
    fi
    command -v runuser >/dev/null || apt_install util-linux
  fi

  local base="${TMPDIR:-/tmp}"
  _SB_PG_DIR="$(mktemp -d "$base/spin-bulk-pg.XXXXXX")"
  # The cluster's owner must be able to reach the directory; fall back to /tmp when it can't
  # (e.g. TMPDIR under /root).
  if is_root; then
    chown postgres: "$_SB_PG_DIR"
    if ! runuser -u postgres -- test -w "$_SB_PG_DIR"; then
      rm -rf "$_SB_PG_DIR"
      _SB_PG_DIR="$(mktemp -d /tmp/spin-bulk-pg.XXXXXX)"
      chown postgres: "$_SB_PG_DIR"
    fi
  fi
  chmod 700 "$_SB_PG_DIR"
  on_exit _pg_stop

  local port="${PG_PORT:-$(free_port)}"
  log "starting a throwaway PostgreSQL ($("$_SB_PG_BIN/postgres" --version | awk '{print $3}')) on 127.0.0.1:$port in $_SB_PG_DIR"
  _pg_as_owner "$_SB_PG_BIN/initdb" -D "$_SB_PG_DIR/data" -U postgres -A trust -E UTF8 --locale=C \
    >"$_SB_PG_DIR/initdb.log" 2>&1 || {
    cat "$_SB_PG_DIR/initdb.log" >&2
    die "initdb failed"
  }
  local opts="-c listen_addresses=127.0.0.1 -p $port -k $_SB_PG_DIR"
  opts+=" -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
  opts+=" -c max_connections=300 -c shared_buffers=1GB -c max_wal_size=4GB"
  _pg_as_owner "$_SB_PG_BIN/pg_ctl" -D "$_SB_PG_DIR/data" -l "$_SB_PG_DIR/postgres.log" \
    -o "$opts" -w -t 60 start >/dev/null || {
    cat "$_SB_PG_DIR/postgres.log" >&2
    die "PostgreSQL did not start"
  }
  _SB_PG_STOP_HINT="$(is_root && printf 'runuser -u postgres -- ')$_SB_PG_BIN/pg_ctl -D $_SB_PG_DIR/data stop && rm -rf $_SB_PG_DIR"
  export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres?sslmode=disable"
  export PG_HOSTPORT="127.0.0.1:$port"
  export PG_LOG="$_SB_PG_DIR/postgres.log"
}

# psql with the options every script wants.
pg_psql() {
  PGOPTIONS="${PGOPTIONS:-} -c client_min_messages=warning" psql -X -q -v ON_ERROR_STOP=1 "$@"
}

# Apply schema/schema.sql (idempotent) to the given URL, default $DATABASE_URL.
apply_schema() {
  local url="${1:-$DATABASE_URL}"
  pg_psql "$url" -f "$REPO_ROOT/schema/schema.sql"
}
