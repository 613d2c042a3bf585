#!/usr/bin/env bash
# Installs walkeep on a PostgreSQL server and turns on WAL archiving into a repository.
#
#   scripts/install.sh --pgdata /var/lib/postgresql/16/main [--repo /var/lib/walkeep/repo]
#                      [--conninfo "host=/var/run/postgresql user=postgres"] [--restart]
#
# What it does, each step skipped when already done, so that running it again changes
# nothing (it compares before it writes):
#
#   1. copies walkeep, walkeep-archive, walkeep-restore (from --from) and
#      walkeep-scheduled-backup (scripts/scheduled-backup.sh) into --prefix;
#   2. writes --config (repo, pgdata, conninfo), mode 0600, owned by the data directory's
#      owner, who runs archive_command;
#   3. runs `walkeep init`, which binds the repository to this cluster (idempotent);
#   4. writes walkeep.conf into the conf.d directory: postgres-conf/walkeep.conf with
#      /usr/local/bin and /etc/walkeep/walkeep.toml replaced by --prefix and --config;
#      adds `include_dir` to postgresql.conf if it does not include that directory yet;
#   5. reloads PostgreSQL when a setting is not in force; wal_level and archive_mode need a
#      restart: with --restart it restarts (pg_ctl restart, or --restart-command), without
#      it stops with exit status 3 and says what to do;
#   6. runs `walkeep check`: the settings are right and a WAL segment reaches the
#      repository.
#
# Options (an option wins over the environment variable named after it):
#   --pgdata DIR           data directory (PGDATA); required
#   --repo LOCATION        repository path or file:// URL (WALKEEP_REPO);
#                          default /var/lib/walkeep/repo
#   --prefix DIR           where the programs go (WALKEEP_PREFIX); default /usr/local/bin
#   --config FILE          walkeep's config file (WALKEEP_CONFIG);
#                          default /etc/walkeep/walkeep.toml
#   --conf-dir DIR         where walkeep.conf goes; default: conf.d beside the server's
#                          postgresql.conf
#   --server-config FILE   the server's postgresql.conf; default: SHOW config_file, or
#                          with --offline PGDATA/postgresql.conf (on Debian, pass
#                          /etc/postgresql/<version>/<cluster>/postgresql.conf)
#   --conninfo STRING      libpq connection string for a superuser, also written to the
#                          config file; default: libpq's defaults and PG* variables
#   --from DIR             the built binaries (WALKEEP_BUILD_DIR); default target/release
#                          of this checkout (cargo build --release)
#   --pg-bindir DIR        PostgreSQL's programs (pg_ctl, psql); default
#                          /usr/lib/postgresql/<PG_VERSION>/bin if present, else
#                          pg_config --bindir, else PATH
#   --restart              restart PostgreSQL if a setting needs it
#   --restart-command CMD  how to restart, e.g. "systemctl restart postgresql@16-main";
#                          default: pg_ctl restart -D PGDATA -m fast
#   --server-log FILE      the server's output on a pg_ctl restart (pg_ctl -l);
#                          default PGDATA/log/postmaster.log
#   --check-timeout SECS   how long walkeep check waits for a segment; default 60
#   --offline              the server is not running: install the files only (steps 1, 2
#                          and 4), so that it archives from its first minute when it
#                          starts (a rebuilt server, say); run again without --offline
#                          once it runs, to bind the repository and check
#
# Run it as root (everything that touches PostgreSQL or the repository then runs as the
# data directory's owner) or as that owner (who must then be able to write --prefix and
# the config file's directory). The server must be running, unless --offline.
#
# Exit status: 0 installed and checked (with --offline: installed); 1 a step failed
# (named on stderr); 2 usage error;
# 3 settings written, but PostgreSQL must be restarted before they take effect (rerun with
# --restart, or restart it yourself and rerun).
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
exec </dev/null

EXIT_FAILURE=1
EXIT_USAGE=2
EXIT_RESTART_NEEDED=3

# The paths postgres-conf/walkeep.conf is written for; replaced by --prefix and --config.
TEMPLATE_PREFIX=/usr/local/bin
TEMPLATE_CONFIG=/etc/walkeep/walkeep.toml

# The settings walkeep.conf makes; each must come from that file once installed.
SETTINGS=(archive_command archive_mode archive_timeout wal_level)

say() { printf 'install: %s\n' "$*"; }

die() {
    printf 'install: error: %s\n' "$*" >&2
    exit "$EXIT_FAILURE"
}

usage_error() {
    printf 'install: %s\n(see the top of %s for the options)\n' "$*" "${BASH_SOURCE[0]}" >&2
    exit "$EXIT_USAGE"
}

# ---------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------

PGDATA_DIR=${PGDATA:-}
REPO=${WALKEEP_REPO:-/var/lib/walkeep/repo}
PREFIX=${WALKEEP_PREFIX:-$TEMPLATE_PREFIX}
CONFIG=${WALKEEP_CONFIG:-$TEMPLATE_CONFIG}
CONF_DIR=''
SERVER_CONFIG_FILE=''
CONNINFO=''
FROM=${WALKEEP_BUILD_DIR:-$ROOT/target/release}
PG_BINDIR=''
RESTART=0
OFFLINE=0
RESTART_COMMAND=''
SERVER_LOG=''
CHECK_TIMEOUT=60

while [ $# -gt 0 ]; do
    case "$1" in
        --restart) RESTART=1; shift; continue ;;
        --offline) OFFLINE=1; shift; continue ;;
        -h | --help) sed -n '2,/^set -Eeuo/{/^set/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
        --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
    esac
    case "$1" in
        --pgdata | --repo | --prefix | --config | --conf-dir | --server-config | --conninfo | --from | --pg-bindir | --restart-command | --server-log | --check-timeout) [ $# -ge 2 ] || usage_error "option $1 needs a value" ;;
        *) usage_error "unknown option $1" ;;
    esac
    case "$1" in
        --pgdata) PGDATA_DIR=$2 ;;
        --repo) REPO=$2 ;;
        --prefix) PREFIX=$2 ;;
        --config) CONFIG=$2 ;;
        --conf-dir) CONF_DIR=$2 ;;
        --server-config) SERVER_CONFIG_FILE=$2 ;;
        --conninfo) CONNINFO=$2 ;;
        --from) FROM=$2 ;;
        --pg-bindir) PG_BINDIR=$2 ;;
        --restart-command) RESTART_COMMAND=$2 ;;
        --server-log) SERVER_LOG=$2 ;;
        --check-timeout) CHECK_TIMEOUT=$2 ;;
        *) usage_error "unknown option $1" ;;
    esac
    shift 2
done

[ -n "$PGDATA_DIR" ] || usage_error "no data directory: pass --pgdata or set PGDATA"
[[ "$CHECK_TIMEOUT" =~ ^[0-9]+$ ]] || usage_error "--check-timeout takes whole seconds"

absolute() {
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s/%s\n' "$PWD" "$1" ;;
    esac
}
PGDATA_DIR=$(absolute "$PGDATA_DIR")
PREFIX=$(absolute "$PREFIX")
CONFIG=$(absolute "$CONFIG")
FROM=$(absolute "$FROM")
[ -z "$CONF_DIR" ] || CONF_DIR=$(absolute "$CONF_DIR")
[ -z "$SERVER_CONFIG_FILE" ] || SERVER_CONFIG_FILE=$(absolute "$SERVER_CONFIG_FILE")
[ -z "$SERVER_LOG" ] || SERVER_LOG=$(absolute "$SERVER_LOG")
case "$REPO" in
    *://*) ;;
    *) REPO=$(absolute "$REPO") ;;
esac

# These land unquoted in archive_command and inside TOML and postgresql.conf strings.
for path in "$PREFIX" "$CONFIG"; do
    case "$path" in
        *[!A-Za-z0-9/._+@,:=-]*) usage_error "path $path has characters archive_command would need quoted" ;;
    esac
done
for value in "$PGDATA_DIR" "$REPO" "$CONNINFO" "$CONF_DIR" "$SERVER_CONFIG_FILE"; do
    case "$value" in
        *[\"\\\']* | *$'\n'*) usage_error "quotes, backslashes and newlines are not supported in $value" ;;
    esac
done

# Relative paths were resolved; nothing below depends on the directory we started in, and
# the cluster's OS user may not be able to enter it.
cd /

# ---------------------------------------------------------------------------------------
# Who runs what
# ---------------------------------------------------------------------------------------

[ -f "$PGDATA_DIR/PG_VERSION" ] || die "$PGDATA_DIR is not a data directory (no PG_VERSION)"
PG_MAJOR=$(cat "$PGDATA_DIR/PG_VERSION")
OS_USER=$(stat -c %U "$PGDATA_DIR")
OS_GROUP=$(stat -c %G "$PGDATA_DIR")
IS_ROOT=0
[ "$(id -u)" -ne 0 ] || IS_ROOT=1

if [ "$IS_ROOT" -eq 1 ]; then
    [ "$OS_USER" != root ] || die "$PGDATA_DIR belongs to root; PostgreSQL never runs as root"
    OS_HOME=$(getent passwd "$OS_USER" | cut -d: -f6)
    [ -d "$OS_HOME" ] || OS_HOME=/
    if command -v runuser >/dev/null 2>&1; then
        AS_OWNER=(runuser -u "$OS_USER" --)
    else
        AS_OWNER=(setpriv "--reuid=$OS_USER" "--regid=$OS_GROUP" --init-groups)
    fi
    AS_OWNER+=(env "HOME=$OS_HOME" "USER=$OS_USER" "LOGNAME=$OS_USER")
elif [ "$(id -un)" = "$OS_USER" ]; then
    AS_OWNER=()
else
    die "$PGDATA_DIR belongs to $OS_USER: run this as root or as $OS_USER"
fi

# as_owner CMD...: runs CMD as the data directory's owner.
as_owner() { "${AS_OWNER[@]}" "$@"; }

if [ -z "$PG_BINDIR" ]; then
    for dir in "/usr/lib/postgresql/$PG_MAJOR/bin" "$(pg_config --bindir 2>/dev/null || true)"; do
        if [ -n "$dir" ] && [ -x "$dir/pg_ctl" ]; then
            PG_BINDIR=$dir
            break
        fi
    done
fi
pg_program() {
    if [ -n "$PG_BINDIR" ]; then
        printf '%s/%s\n' "$PG_BINDIR" "$1"
    else
        command -v "$1" || die "$1 not found: pass --pg-bindir"
    fi
}
PSQL=$(pg_program psql)
PG_CTL=$(pg_program pg_ctl)

# sql QUERY: runs QUERY on the server, as the data directory's owner, printing unaligned
# tuples with fields separated by '|'.
sql() {
    local conn=()
    [ -z "$CONNINFO" ] || conn=(-d "$CONNINFO")
    as_owner "$PSQL" -X -q -A -t -v ON_ERROR_STOP=1 "${conn[@]}" -c "$1"
}

# walkeep ARGS...: the installed walkeep, as the owner, with the config file's settings
# alone (no repository from this environment).
walkeep() { as_owner env -u WALKEEP_REPO "$PREFIX/walkeep" "$@"; }

# ---------------------------------------------------------------------------------------
# Writing files only when they differ
# ---------------------------------------------------------------------------------------

CHANGED=()

# place TEMP DEST MODE [OWNER GROUP]: makes DEST hold TEMP's bytes with MODE (and owner),
# renaming TEMP over it only if the bytes differ; removes TEMP otherwise.
place() {
    local temp=$1 dest=$2 mode=$3 owner=${4:-} group=${5:-}
    if [ -f "$dest" ] && cmp -s "$temp" "$dest"; then
        rm -f "$temp"
        if [ "$(stat -c %a "$dest")" != "${mode#0}" ]; then
            chmod "$mode" "$dest"
            CHANGED+=("$dest (mode)")
        fi
        if [ -n "$owner" ] && [ "$(stat -c %U:%G "$dest")" != "$owner:$group" ]; then
            chown "$owner:$group" "$dest"
            CHANGED+=("$dest (owner)")
        fi
        say "unchanged: $dest"
        return
    fi
    chmod "$mode" "$temp"
    [ -z "$owner" ] || chown "$owner:$group" "$temp"
    sync "$temp" 2>/dev/null || true
    mv -f "$temp" "$dest"
    CHANGED+=("$dest")
    say "wrote:     $dest"
}

# new_temp_for DEST: a new empty file beside DEST (same filesystem, so the rename is atomic).
new_temp_for() {
    [ -w "$(dirname "$1")" ] || die "cannot write in $(dirname "$1") as $(id -un): run this as root"
    mktemp "$(dirname "$1")/.$(basename "$1").XXXXXX"
}

# install_program SRC DEST: copies an executable, mode 0755.
install_program() {
    [ -f "$1" ] || die "$1 not found: build walkeep first (cargo build --release) or pass --from"
    local temp
    temp=$(new_temp_for "$2")
    cp "$1" "$temp"
    place "$temp" "$2" 0755
}

# write_text DEST MODE OWNER GROUP TEXT: writes TEXT to DEST.
write_text() {
    local temp
    temp=$(new_temp_for "$1")
    printf '%s' "$5" >"$temp"
    place "$temp" "$1" "$2" "$3" "$4"
}

# make_dir DIR MODE OWNER GROUP: creates DIR (and missing parents) if it does not exist.
make_dir() {
    [ ! -d "$1" ] || return 0
    if [ "$IS_ROOT" -eq 1 ]; then
        mkdir -p "$(dirname "$1")"
        install -d -m "$2" -o "$3" -g "$4" "$1"
    else
        mkdir -p "$1"
        chmod "$2" "$1"
    fi
    CHANGED+=("$1")
    say "created:   $1"
}

# The owner and group files for the server get: the data directory's, when we can set it.
owner_args() {
    if [ "$IS_ROOT" -eq 1 ]; then
        printf '%s\n%s\n' "$OS_USER" "$OS_GROUP"
    else
        printf '\n\n'
    fi
}
mapfile -t OWNER < <(owner_args)

# ---------------------------------------------------------------------------------------
# 0. The server is up (unless --offline), and it is the one in --pgdata
# ---------------------------------------------------------------------------------------

if [ "$OFFLINE" -eq 0 ]; then
    server_dir=$(sql "SHOW data_directory") \
        || die "cannot connect to PostgreSQL${CONNINFO:+ with \"$CONNINFO\"}: start it, pass --conninfo, or pass --offline to install the files only"
    [ "$(realpath "$server_dir")" = "$(realpath "$PGDATA_DIR")" ] \
        || die "the server connected to runs on $server_dir, not on --pgdata $PGDATA_DIR"
    [ "$(sql "SELECT rolsuper FROM pg_roles WHERE rolname = current_user")" = t ] \
        || die "connect as a superuser: reloading and reading where settings come from need one"
    [ -n "$SERVER_CONFIG_FILE" ] || SERVER_CONFIG_FILE=$(sql "SHOW config_file")
else
    [ -n "$SERVER_CONFIG_FILE" ] || SERVER_CONFIG_FILE=$PGDATA_DIR/postgresql.conf
fi
as_owner test -f "$SERVER_CONFIG_FILE" || die "$SERVER_CONFIG_FILE not found: pass --server-config"
if [ -z "$CONF_DIR" ]; then
    CONF_DIR=$(dirname "$SERVER_CONFIG_FILE")/conf.d
fi
SNIPPET=$CONF_DIR/walkeep.conf

# ---------------------------------------------------------------------------------------
# 1. Programs
# ---------------------------------------------------------------------------------------

make_dir "$PREFIX" 0755 root root
for program in walkeep walkeep-archive walkeep-restore; do
    install_program "$FROM/$program" "$PREFIX/$program"
done
install_program "$ROOT/scripts/scheduled-backup.sh" "$PREFIX/walkeep-scheduled-backup"

# ---------------------------------------------------------------------------------------
# 2. Config file
# ---------------------------------------------------------------------------------------

config_text="# walkeep settings, written by walkeep's scripts/install.sh. Read by walkeep,
# walkeep-restore and walkeep-archive (PostgreSQL's archive_command names this file).
# A command-line option or a WALKEEP_* variable wins over a setting here.
repo = \"$REPO\"
pgdata = \"$PGDATA_DIR\"
"
[ -z "$CONNINFO" ] || config_text+="conninfo = \"$CONNINFO\"
"
# Everything else an operator added (spool_dir, [s3] and its credentials, a conninfo when
# none is given here, ...) is kept, after the keys above: top-level keys must come before
# any table.
if [ -f "$CONFIG" ]; then
    [ -r "$CONFIG" ] || die "cannot read $CONFIG, whose settings a rerun must keep"
    ours='repo|pgdata'
    [ -z "$CONNINFO" ] || ours+='|conninfo'
    header=$(printf '%s\n' "$config_text" | grep '^#')
    kept=$(grep -v -E "^[[:space:]]*($ours)[[:space:]]*=" "$CONFIG" \
        | grep -v -x -F "$header") || true
    [ -z "$kept" ] || config_text+="$kept
"
fi
make_dir "$(dirname "$CONFIG")" 0755 root root
write_text "$CONFIG" 0600 "${OWNER[0]}" "${OWNER[1]}" "$config_text"
as_owner test -r "$CONFIG" || die "$OS_USER cannot read $CONFIG, so archive_command could not"

# ---------------------------------------------------------------------------------------
# 3. Repository
# ---------------------------------------------------------------------------------------

if [ "$OFFLINE" -eq 0 ]; then
    case "$REPO" in
        file://*) make_dir "${REPO#file://}" 0700 "$OS_USER" "$OS_GROUP" ;;
        *://*) ;;
        *) make_dir "$REPO" 0700 "$OS_USER" "$OS_GROUP" ;;
    esac
    identity_before=$(as_owner cat "${REPO#file://}/repository.json" 2>/dev/null || true)
    walkeep init --config "$CONFIG" --pgdata "$PGDATA_DIR"
    if [ "$identity_before" != "$(as_owner cat "${REPO#file://}/repository.json" 2>/dev/null || true)" ]; then
        CHANGED+=("$REPO")
    fi
fi

# ---------------------------------------------------------------------------------------
# 4. conf.d snippet, included from postgresql.conf
# ---------------------------------------------------------------------------------------

changed_before_conf=${#CHANGED[@]}
TEMPLATE=$ROOT/postgres-conf/walkeep.conf
[ -f "$TEMPLATE" ] || die "$TEMPLATE not found: run this from a walkeep checkout"
snippet_text=$(cat "$TEMPLATE")
snippet_text=${snippet_text//"$TEMPLATE_PREFIX/"/"$PREFIX/"}
snippet_text=${snippet_text//"$TEMPLATE_CONFIG"/"$CONFIG"}
WANTED_ARCHIVE_COMMAND="$PREFIX/walkeep-archive --config $CONFIG %p %f"
grep -qxF "archive_command = '$WANTED_ARCHIVE_COMMAND'" <<<"$snippet_text" \
    || die "$TEMPLATE has no line archive_command = '$TEMPLATE_PREFIX/walkeep-archive --config $TEMPLATE_CONFIG %p %f'"
make_dir "$CONF_DIR" 0700 "$OS_USER" "$OS_GROUP"
write_text "$SNIPPET" 0600 "${OWNER[0]}" "${OWNER[1]}" "$snippet_text"$'\n'

# includes_conf_dir: true if and only if postgresql.conf has an active include_dir line
# naming CONF_DIR (relative names are relative to postgresql.conf's directory).
includes_conf_dir() {
    local base value
    base=$(dirname "$SERVER_CONFIG_FILE")
    while IFS= read -r value; do
        case "$value" in /*) ;; *) value=$base/$value ;; esac
        [ "$(realpath -m "$value")" != "$(realpath -m "$CONF_DIR")" ] || return 0
    done < <(as_owner sed -nE "s/^[[:space:]]*include_dir[[:space:]]*=?[[:space:]]*'([^']*)'.*/\\1/p" \
        "$SERVER_CONFIG_FILE")
    return 1
}
if includes_conf_dir; then
    say "unchanged: $SERVER_CONFIG_FILE (includes $CONF_DIR)"
else
    include=$CONF_DIR
    [ "$(dirname "$CONF_DIR")" != "$(dirname "$SERVER_CONFIG_FILE")" ] || include=$(basename "$CONF_DIR")
    # Appended last, so that walkeep.conf wins over earlier lines of postgresql.conf.
    printf "\n# Added by walkeep's install.sh: the files in %s (walkeep.conf: WAL archiving)\n# override the settings above.\ninclude_dir = '%s'\n" \
        "$include" "$include" | as_owner tee -a "$SERVER_CONFIG_FILE" >/dev/null
    CHANGED+=("$SERVER_CONFIG_FILE")
    say "appended:  include_dir = '$include' to $SERVER_CONFIG_FILE"
fi

# ---------------------------------------------------------------------------------------
# 5. Reload, restart if needed
# ---------------------------------------------------------------------------------------

if [ "$OFFLINE" -eq 1 ]; then
    say "installed; repository not initialised, PostgreSQL not reloaded, archiving not"
    say "checked (--offline): start PostgreSQL, then run this again without --offline"
    exit 0
fi

SNIPPET_REAL=$(realpath "$SNIPPET")

# setting_states: one line per walkeep setting, "NAME STATE WHERE ERROR":
#   applied    in force, from walkeep.conf
#   reload     walkeep.conf's value is not in force yet; a reload puts it there
#   pending    walkeep.conf's value needs a restart (wal_level, archive_mode)
#   elsewhere  a later file (postgresql.auto.conf, say) or the command line wins
#   invalid    PostgreSQL rejects walkeep.conf's value
# The winning line of the files is the last one pg_file_settings lists (it reads the files
# as they are now); pg_settings says what is in force.
setting_states() {
    local names
    names=$(printf "'%s'," "${SETTINGS[@]}")
    names=${names%,}
    sql "WITH winner AS (
             SELECT DISTINCT ON (name) name, sourcefile, sourceline, applied, error
             FROM pg_file_settings WHERE name IN ($names) ORDER BY name, seqno DESC)
         SELECT s.name,
                CASE WHEN s.source = 'command line' OR w.name IS NULL
                          OR w.sourcefile NOT IN ('$SNIPPET', '$SNIPPET_REAL') THEN 'elsewhere'
                     WHEN w.error IS NOT NULL
                          AND w.error <> 'setting could not be applied' THEN 'invalid'
                     WHEN s.pending_restart OR NOT w.applied THEN 'pending'
                     WHEN s.context = 'postmaster' OR (s.sourcefile = w.sourcefile
                          AND s.sourceline = w.sourceline) THEN 'applied'
                     ELSE 'reload' END,
                CASE WHEN s.source = 'command line' THEN 'the-command-line'
                     ELSE coalesce(w.sourcefile || ':' || w.sourceline, s.source) END,
                coalesce(w.error, '')
         FROM pg_settings s LEFT JOIN winner w USING (name)
         WHERE s.name IN ($names) ORDER BY s.name" | tr '|' ' '
}

# count_states STATE: how many settings are in STATE.
count_states() { grep -c "^[a-z_]* $1 " <<<"$STATES" || true; }

STATES=$(setting_states)
# A value rewritten in place keeps its file and line, so a changed file is reloaded too.
if [ "$(count_states reload)" -ne 0 ] || [ "${#CHANGED[@]}" -gt "$changed_before_conf" ]; then
    say "reloading PostgreSQL's configuration"
    sql "SELECT pg_reload_conf()" >/dev/null
    # The postmaster rereads its files when it gets round to the signal, and a new
    # connection then sees the new values; poll until none waits for the reload.
    for _ in $(seq 1 100); do
        STATES=$(setting_states)
        [ "$(count_states reload)" -ne 0 ] || break
        sleep 0.1
    done
fi

# not_in_force: says which settings are not in force and why, then fails.
not_in_force() {
    printf 'install: these settings are not in force from %s:\n' "$SNIPPET" >&2
    awk '$2 != "applied" {
             error = ""
             for (i = 4; i <= NF; i++) error = error " " $i
             printf "install:   %s: %s (%s)%s\n", $1, $2, $3, error
         }' <<<"$STATES" >&2
    printf 'install: a later file or the command line wins over conf.d: remove the setting there\n' >&2
    printf 'install: (postgresql.auto.conf: ALTER SYSTEM RESET name), and see the server log.\n' >&2
    exit "$EXIT_FAILURE"
}
if [ "$(count_states elsewhere)" -ne 0 ] || [ "$(count_states invalid)" -ne 0 ]; then
    not_in_force
fi

if [ "$(count_states pending)" -ne 0 ]; then
    pending=$(awk '$2 == "pending" { print $1 }' <<<"$STATES" | paste -sd, -)
    if [ "$RESTART" -eq 0 ]; then
        printf 'install: PostgreSQL must be restarted for %s to take effect.\n' "$pending" >&2
        printf 'install: rerun with --restart, or restart it yourself (e.g. systemctl restart postgresql@%s-main,\n' "$PG_MAJOR" >&2
        printf 'install: or pg_ctl restart -D %s) and run this again to check archiving.\n' "$PGDATA_DIR" >&2
        exit "$EXIT_RESTART_NEEDED"
    fi
    if [ -n "$RESTART_COMMAND" ]; then
        say "restarting PostgreSQL for $pending: $RESTART_COMMAND"
        sh -c "$RESTART_COMMAND"
    else
        [ -n "$SERVER_LOG" ] || SERVER_LOG=$PGDATA_DIR/log/postmaster.log
        as_owner mkdir -p "$(dirname "$SERVER_LOG")"
        say "restarting PostgreSQL for $pending (pg_ctl restart, server output to $SERVER_LOG)"
        as_owner "$PG_CTL" restart -D "$PGDATA_DIR" -m fast -w -t 300 -l "$SERVER_LOG" >/dev/null
    fi
    CHANGED+=("PostgreSQL restarted")
    for _ in $(seq 1 300); do
        sql "SELECT 1" >/dev/null 2>&1 && break
        sleep 0.2
    done
    STATES=$(setting_states)
fi

[ "$(count_states applied)" -eq "${#SETTINGS[@]}" ] || not_in_force
say "in force from $SNIPPET: ${SETTINGS[*]}"

# ---------------------------------------------------------------------------------------
# 6. Prove it: a segment reaches the repository
# ---------------------------------------------------------------------------------------

check_args=(check --config "$CONFIG" --timeout "$CHECK_TIMEOUT")
[ -z "$CONNINFO" ] || check_args+=(-d "$CONNINFO")
walkeep "${check_args[@]}" || die "walkeep check failed (see above)"

if [ "${#CHANGED[@]}" -eq 0 ]; then
    say "done; nothing changed"
else
    say "done; changed: ${CHANGED[*]}"
fi
