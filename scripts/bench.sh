#!/usr/bin/env bash
# walkeep benchmark: walkeep against cp, pgBackRest and pg_basebackup, on real WAL from a
# pgbench run, on a throwaway PostgreSQL 15 cluster. docs/BENCHMARKS.md has the method, the
# machine and the last results.
#
#   scripts/bench.sh               the full run: about 15 to 20 minutes after the build
#   scripts/bench.sh --quick       a smoke run: fewer segments and rounds, a small database
#   scripts/bench.sh --help        every option
#
# What it measures, each in alternation (the order of the tools rotates every round) and
# over 5 rounds (--rounds; at least 3 for a figure worth quoting), reporting median, min
# and max and every ratio against pgBackRest:
#
#   criterion  the per-segment pipeline (benches/pipeline.rs) on the corpus: the floor
#   archive    one process per segment, as PostgreSQL's archiver calls them, outside the
#              server: cp, cp with fsync, pgBackRest archive-push (zst; synchronous, and
#              asynchronous with process-max 2), walkeep-archive without and with read-ahead
#   restore    the same for restore_command: cp, pgBackRest archive-get (synchronous,
#              asynchronous), walkeep-restore without and with prefetch; probes for a
#              missing segment and a missing .history file; process start
#   drain      a backlog of .ready segments drained by the server's own archiver: time
#              from setting archive_command to the last .done
#   backup     base backup, then PITR restore and recovery to promotion, of a pgbench
#              database: walkeep against pgBackRest (zst, process-max 2) and pg_basebackup
#
# Other work on the machine is the largest source of noise: before every timed run the
# script waits (up to 5 minutes, once) for the CPUs to be idle, and the report says how
# busy they were. Run one benchmark at a time.
#
# Works as a normal user and as root, which is how CI runs: PostgreSQL refuses to run as
# root, so then PostgreSQL, pgBackRest and walkeep all run as the `postgres` OS user
# (WALKEEP_BENCH_USER to choose another), from binaries copied into the work directory.
# Needs PostgreSQL 15, pgBackRest and GNU time; as root it installs the Debian packages
# pgbackrest and time when they are missing. Everything it makes, the WAL corpus included,
# lives in one mktemp -d work directory that is removed at exit (--keep to keep it).
set -Eeuo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
exec </dev/null

# Only the settings given here may reach libpq, pgBackRest and walkeep.
while read -r var; do unset "$var"; done \
    < <(compgen -e | grep -E '^(PG[A-Z]|PGBACKREST_|WALKEEP_(REPO|CONFIG|SPOOL_DIR|RESTORE_ON_ERROR)$)' || true)

usage() {
    cat <<'EOF'
Usage: scripts/bench.sh [OPTIONS]

  --quick            smoke run: 16 segments, a backlog of 40, pgbench scale 5, 2 rounds
  --rounds N         rounds of every measurement (default 5)
  --segments N       WAL segments in the corpus (default 64)
  --backlog N        .ready segments the server's archiver drains (default 200)
  --scale N          pgbench scale of the backup database (default 76: about 1.1 GiB)
  --phases LIST      comma-separated, from criterion,archive,restore,drain,backup
                     (default: all of them)
  --bin-dir DIR      take walkeep, walkeep-archive and walkeep-restore from DIR instead
                     of building them (criterion still builds benches/pipeline.rs)
  --out DIR          also write results.tsv, summary.tsv, report.md and the logs to DIR
  --keep             keep the work directory (clusters, repositories, corpus, logs)
  -h, --help         this help

Environment: WALKEEP_BENCH_USER (cluster user when run as root, default postgres),
WALKEEP_BENCH_READAHEAD (archive_readahead of the read-ahead variant, default 2, as
pgBackRest's process-max), WALKEEP_BENCH_PREFETCH (restore_prefetch, default 4),
WALKEEP_BENCH_LEVEL (compress_level for walkeep; default: walkeep's own default).

Exit status: 0 when every measurement ran and checked out (floors that are not met are
reported, not failed); 1 on any failure, naming the step.
EOF
}

QUICK=0
ROUNDS='' SEGMENTS='' BACKLOG='' SCALE='' PHASES='criterion,archive,restore,drain,backup'
BIN_DIR='' OUT_DIR='' KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --rounds) ROUNDS=${2:?--rounds needs a value}; shift ;;
        --segments) SEGMENTS=${2:?--segments needs a value}; shift ;;
        --backlog) BACKLOG=${2:?--backlog needs a value}; shift ;;
        --scale) SCALE=${2:?--scale needs a value}; shift ;;
        --phases) PHASES=${2:?--phases needs a value}; shift ;;
        --bin-dir) BIN_DIR=${2:?--bin-dir needs a value}; shift ;;
        --out) OUT_DIR=${2:?--out needs a value}; shift ;;
        --keep) KEEP=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "bench: unknown option $1 (see --help)" >&2; exit 1 ;;
    esac
    shift
done
if [ "$QUICK" = 1 ]; then
    : "${ROUNDS:=2}" "${SEGMENTS:=16}" "${BACKLOG:=40}" "${SCALE:=5}"
    PITR_TX=500 WALGEN_SECONDS=5 PROBES=10
else
    : "${ROUNDS:=5}" "${SEGMENTS:=64}" "${BACKLOG:=200}" "${SCALE:=76}"
    PITR_TX=25000 WALGEN_SECONDS=20 PROBES=20
fi
for n in "$ROUNDS" "$SEGMENTS" "$BACKLOG" "$SCALE"; do
    case "$n" in '' | *[!0-9]* | 0) echo "bench: counts must be positive integers" >&2; exit 1 ;; esac
done
READAHEAD=${WALKEEP_BENCH_READAHEAD:-2}
PREFETCH=${WALKEEP_BENCH_PREFETCH:-4}
LEVEL=${WALKEEP_BENCH_LEVEL:-}
case "$READAHEAD$PREFETCH$LEVEL" in *[!0-9]*) echo "bench: WALKEEP_BENCH_* must be integers" >&2; exit 1 ;; esac
phase() { case ",$PHASES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
for p in ${PHASES//,/ }; do
    case "$p" in criterion | archive | restore | drain | backup) ;;
        *) echo "bench: unknown phase $p" >&2; exit 1 ;; esac
done

# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------

if [ -t 1 ] && [ -z "${NO_COLOR:-}" ]; then
    BOLD=$'\033[1m' RED=$'\033[31m' DIM=$'\033[2m' RESET=$'\033[0m'
else
    BOLD='' RED='' DIM='' RESET=''
fi
STEP=setup
BENCH_START=$SECONDS

PHASE=setup
section() {
    STEP=$1 PHASE=${2:-$1}
    printf '\n%s==> %s%s %s(%d s in)%s\n' "$BOLD" "$1" "$RESET" "$DIM" "$((SECONDS - BENCH_START))" "$RESET"
}
say() { printf '    %s\n' "$*"; }
die() {
    printf '%sbench: %s%s\n' "$RED" "$*" "$RESET" >&2
    exit 1
}

# ---------------------------------------------------------------------------------------
# Cleanup: stop the sampler and every cluster, let background workers finish, remove the
# work directory
# ---------------------------------------------------------------------------------------

WORK='' SAMPLER_PID='' CLUSTERS=()
cleanup() {
    local status=$?
    set +e
    trap - ERR
    if [ -n "$SAMPLER_PID" ]; then
        kill "$SAMPLER_PID" 2>/dev/null
        wait "$SAMPLER_PID" 2>/dev/null
    fi
    if [ "$status" -ne 0 ]; then
        printf '\n%sFAILED in %s (exit status %s)%s\n' "$RED$BOLD" "$STEP" "$status" "$RESET" >&2
        local log
        for log in "$WORK/logs/primary.log" "$WORK/logs/runner.log" "$WORK"/logs/restored.*.log; do
            [ -s "$log" ] || continue
            printf '%s--- last lines of %s%s\n' "$DIM" "$log" "$RESET" >&2
            tail -n 15 "$log" >&2
        done
    fi
    local data
    for data in "${CLUSTERS[@]}"; do
        [ -f "$data/postmaster.pid" ] && as_cluster "$PGBIN/pg_ctl" stop -D "$data" -m immediate >/dev/null 2>&1
    done
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        # pgBackRest's asynchronous workers and walkeep's prefetch worker end on their own.
        [ -x "$WORK/bin/runner.sh" ] && as_cluster "$WORK/bin/runner.sh" quiesce >/dev/null 2>&1
        if [ -n "$OUT_DIR" ] && [ -d "$WORK/logs" ]; then
            mkdir -p "$OUT_DIR/logs" && cp -r "$WORK/logs/." "$OUT_DIR/logs/" 2>/dev/null
        fi
        if [ "$KEEP" = 1 ]; then
            printf '\nkept the work directory %s (--keep)\n' "$WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$status"
}
trap cleanup EXIT
ERR_SEEN=''
on_err() {
    [ -z "$ERR_SEEN" ] && [ "$BASH_SUBSHELL" -eq 0 ] || return 0
    ERR_SEEN=1
    printf '%sbench: command failed at line %s of %s: %s%s\n' \
        "$RED" "${BASH_LINENO[-2]}" "${BASH_SOURCE[0]##*/}" "$1" "$RESET" >&2
}
trap 'on_err "$BASH_COMMAND"' ERR
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------
# Who runs what, and the tools
# ---------------------------------------------------------------------------------------

AS=()
if [ "$(id -u)" -eq 0 ]; then
    CLUSTER_USER=${WALKEEP_BENCH_USER:-postgres}
    id "$CLUSTER_USER" >/dev/null 2>&1 \
        || die "running as root, so PostgreSQL must run as OS user $CLUSTER_USER, which does not exist"
    if command -v runuser >/dev/null 2>&1; then
        AS=(runuser -u "$CLUSTER_USER" --)
    else
        AS=(setpriv "--reuid=$CLUSTER_USER" "--regid=$CLUSTER_USER" --init-groups
            env "HOME=$(getent passwd "$CLUSTER_USER" | cut -d: -f6)" "USER=$CLUSTER_USER"
            "LOGNAME=$CLUSTER_USER")
    fi
else
    CLUSTER_USER=$(id -un)
fi
as_cluster() { "${AS[@]}" "$@"; }

# need PROGRAM PACKAGE: installs PACKAGE when PROGRAM is missing and we are root.
need() {
    command -v "$1" >/dev/null 2>&1 && return 0
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing $2 (apt-get) for $1 ..."
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
        command -v "$1" >/dev/null 2>&1 && return 0
    fi
    die "$1 not found: install the $2 package (sudo apt-get install $2), or run this script as root"
}

PGBIN=''
for dir in "$(pg_config --bindir 2>/dev/null || true)" /usr/lib/postgresql/15/bin; do
    if [ -n "$dir" ] && [ -x "$dir/initdb" ] && "$dir/postgres" --version 2>/dev/null | grep -q ' 15\.'; then
        PGBIN=$dir
        break
    fi
done
[ -n "$PGBIN" ] || die "PostgreSQL 15 server programs not found (tried pg_config --bindir and /usr/lib/postgresql/15/bin)"
need pgbackrest pgbackrest
[ -x /usr/bin/time ] || need /usr/bin/time time
need cmp diffutils
if ! command -v cargo >/dev/null 2>&1 && [ -f "${HOME:-}/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
if [ -z "$BIN_DIR" ] || phase criterion; then
    command -v cargo >/dev/null 2>&1 || die "cargo not found (install Rust, or source ~/.cargo/env)"
fi

# free_port [EXCEPT]: a TCP port on 127.0.0.1 that nothing listens on.
free_port() {
    local except=${1:-0} port
    for _ in $(seq 1 200); do
        if command -v python3 >/dev/null 2>&1; then
            port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        else
            port=$((20000 + RANDOM % 40000))
        fi
        [ "$port" != "$except" ] || continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
    die "found no free port on 127.0.0.1"
}

# ---------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------

section "build"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
if [ -z "$BIN_DIR" ]; then
    say "cargo build --release --bins ..."
    (cd "$ROOT" && cargo build --release --bins --quiet)
    BIN_DIR=$TARGET_DIR/release
fi
if phase criterion; then
    say "cargo bench --bench pipeline --no-run ..."
    (cd "$ROOT" && cargo bench --bench pipeline --no-run --quiet) >"${TMPDIR:-/tmp}/walkeep-bench-build.$$.log" 2>&1 \
        || { tail -n 20 "${TMPDIR:-/tmp}/walkeep-bench-build.$$.log"; rm -f "${TMPDIR:-/tmp}/walkeep-bench-build.$$.log"
             die "cargo bench --no-run failed"; }
    rm -f "${TMPDIR:-/tmp}/walkeep-bench-build.$$.log"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/walkeep-bench.XXXXXX")
case "$WORK" in
    *[!A-Za-z0-9/._-]*) die "work directory $WORK has characters this script does not quote; set TMPDIR" ;;
esac
BIN=$WORK/bin
PGDATA=$WORK/pg
SOCK=$WORK/sock
FAKEPG=$WORK/fakepg
FAKEWAL=$FAKEPG/pg_wal
PGBR=$WORK/pgbr
WK=$WORK/wk
CPARCH=$WORK/cp/archive
RAW=$WORK/raw
RESULTS=$WORK/results.tsv
mkdir -p "$BIN" "$SOCK" "$WORK/logs" "$RAW" "$FAKEWAL/archive_status" "$FAKEPG/global" \
    "$PGBR" "$WK" "$WORK/cp"
: >"$RESULTS"
for exe in walkeep walkeep-archive walkeep-restore; do
    [ -x "$BIN_DIR/$exe" ] || die "binary $BIN_DIR/$exe not found"
    cp "$BIN_DIR/$exe" "$BIN/"
done
chmod 755 "$BIN"/*
say "walkeep: $("$BIN/walkeep" --version) from $BIN_DIR ($(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo 'no git'))"
say "pgBackRest: $(pgbackrest version); PostgreSQL: $("$PGBIN/postgres" --version)"
say "work directory: $WORK; clusters run as OS user $CLUSTER_USER"

# ---------------------------------------------------------------------------------------
# The runner: the timed loops, run as the cluster user inside one shell, so that no
# runuser or sudo sits between two calls. Times come from bash's $EPOCHREALTIME (no fork).
# ---------------------------------------------------------------------------------------

cat >"$BIN/bench-env.sh" <<EOF
WORK=$WORK
BIN=$BIN
PGDATA=$PGDATA
FAKEPG=$FAKEPG
FAKEWAL=$FAKEWAL
PGBR=$PGBR
WK=$WK
CPARCH=$CPARCH
RAW=$RAW
EOF
cat >"$BIN/runner.sh" <<'RUNNER'
#!/usr/bin/env bash
# The timed loops of scripts/bench.sh, run as the cluster user. One process per call, as
# PostgreSQL makes them; nothing else forks between the two clock readings of a call.
set -euo pipefail
export LC_ALL=C
. "$(dirname "$0")/bench-env.sh"
SEGS=()
[ ! -f "$WORK/corpus.list" ] || mapfile -t SEGS <"$WORK/corpus.list"
WRAP=()
[ -z "${MEMFILE:-}" ] || WRAP=(/usr/bin/time -f %M -a -o "$MEMFILE")
CALLERR=$WORK/logs/call.err
LOG=$WORK/logs/runner.log
DEST=$FAKEWAL/RECOVERYXLOG

fail() { echo "runner: $*" >&2; exit 1; }

archive_one() { # TOOL PATH NAME
    case $1 in
        cp) test ! -f "$CPARCH/$3" && cp "$2" "$CPARCH/$3" ;;
        cp-fsync) test ! -f "$CPARCH/$3" && cp "$2" "$CPARCH/$3.tmp" && sync "$CPARCH/$3.tmp" \
            && mv "$CPARCH/$3.tmp" "$CPARCH/$3" && sync "$CPARCH" ;;
        pgbr-sync) "${WRAP[@]}" pgbackrest --config="$PGBR/sync.conf" --pg1-path="$FAKEPG" \
            --stanza=bench archive-push "$2" ;;
        pgbr-async) "${WRAP[@]}" pgbackrest --config="$PGBR/async.conf" --pg1-path="$FAKEPG" \
            --stanza=bench archive-push "$2" ;;
        walkeep) "${WRAP[@]}" "$BIN/walkeep-archive" --config "$WK/plain.conf" "$2" "$3" ;;
        walkeep-ra) "${WRAP[@]}" "$BIN/walkeep-archive" --config "$WK/ra.conf" "$2" "$3" ;;
        *) fail "unknown archive tool $1" ;;
    esac
}

restore_one() { # TOOL NAME DEST
    case $1 in
        cp) cp "$CPARCH/$2" "$3" ;;
        pgbr-sync) "${WRAP[@]}" pgbackrest --config="$PGBR/sync.conf" --pg1-path="$FAKEPG" \
            --stanza=bench archive-get "$2" "$3" ;;
        pgbr-async) "${WRAP[@]}" pgbackrest --config="$PGBR/async.conf" --pg1-path="$FAKEPG" \
            --stanza=bench archive-get "$2" "$3" ;;
        walkeep) "${WRAP[@]}" "$BIN/walkeep-restore" --config "$WK/plain.conf" "$2" "$3" ;;
        walkeep-pf) "${WRAP[@]}" "$BIN/walkeep-restore" --config "$WK/ra.conf" "$2" "$3" ;;
        *) fail "unknown restore tool $1" ;;
    esac
}

# Whether the call about to be made for NAME finds it pushed ahead by an earlier call.
pushed_ahead() { # TOOL NAME
    case $1 in
        pgbr-async) [ -f "$PGBR/spool/archive/bench/out/$2.ok" ] ;;
        walkeep-ra) compgen -G "$WK/spool/*/archived/$2" >/dev/null ;;
        *) return 1 ;;
    esac
}

# Keeps the call's log lines, and tells whether it says it was served by read-ahead.
keep_log() { # TOOL NAME
    local text=''
    IFS= read -r -d '' text <"$CALLERR" || true
    printf '%s' "$text" >>"$LOG"
    [[ $text == *"pushed ahead"* ]]
}

reset_status() {
    rm -f "$FAKEWAL"/archive_status/*
    local s
    for s in "${SEGS[@]}"; do : >"$FAKEWAL/archive_status/$s.ready"; done
}

# ours /proc/PID: true if and only if the process is a walkeep program from this run's bin
# directory or a pgBackRest started with this run's configuration; other walkeep and
# pgBackRest processes on the machine (another test run, say) are not waited for.
ours() {
    local comm args=()
    { read -r comm <"$1/comm"; } 2>/dev/null || return 1
    case $comm in
        walkeep*) [ "$1/exe" -ef "$BIN/walkeep-archive" ] || [ "$1/exe" -ef "$BIN/walkeep-restore" ] \
            || [ "$1/exe" -ef "$BIN/walkeep" ] ;;
        pgbackrest)
            { mapfile -d '' -t args <"$1/cmdline"; } 2>/dev/null || return 1
            [[ "${args[*]}" == *"$WORK/"* ]] ;;
        *) return 1 ;;
    esac
}

# busy: true while a pgBackRest or walkeep process of this run is alive (background workers
# included), from /proc without forking.
busy() {
    local d
    for d in /proc/[0-9]*; do
        [ -O "$d" ] || continue
        ours "$d" && return 0
    done
    return 1
}

quiesce() {
    local deadline=$((SECONDS + 120))
    while busy; do
        [ "$SECONDS" -lt "$deadline" ] || fail "pgBackRest or walkeep processes still running after 120 s"
        sleep 0.02
    done
}

prep() { # TOOL: an empty repository (and spool) for TOOL's family
    quiesce
    case $1 in
        cp | cp-fsync) rm -rf "$CPARCH" "$WORK/cp/complete"; mkdir -p "$CPARCH" ;;
        pgbr-* | pgbr)
            rm -rf "$PGBR/repo" "$PGBR/spool" "$PGBR/complete"
            mkdir -m 700 "$PGBR/repo" "$PGBR/spool"
            pgbackrest --config="$PGBR/sync.conf" --stanza=bench --log-level-console=error \
                stanza-create >>"$LOG" 2>&1 || fail "pgbackrest stanza-create failed (see $LOG)"
            ;;
        walkeep*)
            rm -rf "$WK/repo" "$WK/spool" "$WK/complete"
            mkdir -m 700 "$WK/spool"
            # From the corpus's directory, not the live cluster's: walkeep init reads the
            # header of the newest file in pg_wal, which fails on a segment PostgreSQL has
            # just preallocated (zero-filled). Same cluster, same identity.
            "$BIN/walkeep" init --repo "$WK/repo" --pgdata "$FAKEPG" >>"$LOG" 2>&1 \
                || fail "walkeep init failed (see $LOG)"
            ;;
        *) fail "unknown tool $1" ;;
    esac
}

clear_spools() {
    quiesce
    rm -rf "$PGBR/spool" "$WK/spool"
    mkdir -m 700 "$PGBR/spool" "$WK/spool"
}

complete_marker() { # TOOL
    case $1 in cp*) echo "$WORK/cp/complete" ;; pgbr*) echo "$PGBR/complete" ;; *) echo "$WK/complete" ;; esac
}

# archive TOOL OUT: every corpus segment in order, marking each .done as the archiver does.
# OUT gets "name microseconds pushed-ahead" per call.
archive() {
    local tool=$1 out=$2 s t0 t1 rc ahead
    reset_status
    : >"$out"
    for s in "${SEGS[@]}"; do
        ahead=0
        pushed_ahead "$tool" "$s" && ahead=1
        t0=${EPOCHREALTIME//[.,]/}
        rc=0
        archive_one "$tool" "$FAKEWAL/$s" "$s" 2>"$CALLERR" || rc=$?
        t1=${EPOCHREALTIME//[.,]/}
        keep_log "$tool" "$s" && ahead=1
        [ "$rc" -eq 0 ] || fail "$tool failed (status $rc) to archive $s; see $LOG"
        mv "$FAKEWAL/archive_status/$s.ready" "$FAKEWAL/archive_status/$s.done"
        echo "$s $((t1 - t0)) $ahead" >>"$out"
    done
    : >"$(complete_marker "$tool")"
}

# restore TOOL OUT: every corpus segment in order into pg_wal/RECOVERYXLOG, checked
# against the original outside the clock. OUT gets "name microseconds" per call.
restore() {
    local tool=$1 out=$2 s t0 t1 rc
    : >"$out"
    for s in "${SEGS[@]}"; do
        rm -f "$DEST"
        t0=${EPOCHREALTIME//[.,]/}
        rc=0
        restore_one "$tool" "$s" "$DEST" 2>"$CALLERR" || rc=$?
        t1=${EPOCHREALTIME//[.,]/}
        keep_log "$tool" "$s" || true
        [ "$rc" -eq 0 ] || fail "$tool failed (status $rc) to restore $s; see $LOG"
        cmp -s "$DEST" "$FAKEWAL/$s" || fail "$tool restored $s with different content"
        echo "$s $((t1 - t0))" >>"$out"
    done
    rm -f "$DEST"
}

# probe TOOL NAME COUNT OUT: asks COUNT times for a file the repository does not hold.
probe() {
    local tool=$1 name=$2 count=$3 out=$4 i t0 t1 rc
    : >"$out"
    for ((i = 0; i < count; i++)); do
        t0=${EPOCHREALTIME//[.,]/}
        rc=0
        restore_one "$tool" "$name" "$DEST" 2>"$CALLERR" || rc=$?
        t1=${EPOCHREALTIME//[.,]/}
        keep_log "$tool" "$name" || true
        [ "$rc" -eq 1 ] || fail "$tool answered $rc, not 1, for the absent $name"
        echo "$name $((t1 - t0))" >>"$out"
    done
}

# dup TOOL COUNT OUT: offers the first COUNT segments again to a repository holding them.
dup() {
    local tool=$1 count=$2 out=$3 s t0 t1 rc
    : >"$out"
    for s in "${SEGS[@]:0:count}"; do
        t0=${EPOCHREALTIME//[.,]/}
        rc=0
        archive_one "$tool" "$FAKEWAL/$s" "$s" 2>"$CALLERR" || rc=$?
        t1=${EPOCHREALTIME//[.,]/}
        keep_log "$tool" "$s" || true
        [ "$rc" -eq 0 ] || fail "$tool failed (status $rc) on the archived $s"
        echo "$s $((t1 - t0))" >>"$out"
    done
}

# start COUNT OUT: process start, exec to exit: walkeep-archive --version.
start() {
    local count=$1 out=$2 i t0 t1
    : >"$out"
    for ((i = 0; i < count; i++)); do
        t0=${EPOCHREALTIME//[.,]/}
        "$BIN/walkeep-archive" --version >/dev/null
        t1=${EPOCHREALTIME//[.,]/}
        echo "start $((t1 - t0))" >>"$out"
    done
}

# reset_backlog LIST: the drained backlog becomes .ready again (archive_command is empty).
reset_backlog() {
    local s
    while read -r s; do
        mv "$PGDATA/pg_wal/archive_status/$s.done" "$PGDATA/pg_wal/archive_status/$s.ready"
    done <"$1"
}

# forget_backlog LIST: the backlog is marked archived, so that a checkpoint recycles it.
forget_backlog() {
    local s
    while read -r s; do
        [ ! -f "$PGDATA/pg_wal/archive_status/$s.ready" ] \
            || mv "$PGDATA/pg_wal/archive_status/$s.ready" "$PGDATA/pg_wal/archive_status/$s.done"
    done <"$1"
}

cmd=$1
shift
case $cmd in
    archive | restore | probe | dup | start | prep | clear_spools | quiesce | reset_backlog | forget_backlog | reset_status)
        "$cmd" "$@" ;;
    *) fail "unknown command $cmd" ;;
esac
RUNNER
chmod 755 "$BIN/runner.sh"
run() { as_cluster "$BIN/runner.sh" "$@"; }

# ---------------------------------------------------------------------------------------
# Results: one line per measurement and round, "metric<TAB>tool<TAB>round<TAB>value"
# ---------------------------------------------------------------------------------------

record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RESULTS"; }
calc() { awk "BEGIN { printf \"%.6g\", $1 }"; }

# median_col FILE COLUMN [FILTER_COLUMN FILTER_VALUE]: median of a column of numbers.
median_col() {
    awk -v c="$2" -v fc="${3:-0}" -v fv="${4:-}" 'fc == 0 || $fc == fv { print $c }' "$1" | sort -g \
        | awk '{ v[NR] = $1 } END { if (NR == 0) exit; if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
sum_col() { awk -v c="$2" '{ s += $c } END { print s + 0 }' "$1"; }
bytes_of() { du -sb "$1" 2>/dev/null | cut -f1; }

# rotate ROUND ITEMS...: ITEMS rotated left by ROUND, so each tool takes each place in turn.
rotate() {
    local r=$1
    shift
    local items=("$@") n=$#
    local i
    for ((i = 0; i < n; i++)); do printf '%s ' "${items[$(((i + r) % n))]}"; done
}

# settle: dirty pages written back (a plain cp leaves them for the next tool otherwise),
# and no background worker of the previous tool still running.
settle() {
    sync
    run quiesce
    quiet
}

# busy_pct SECONDS: the share of all CPU time the machine spent busy over SECONDS.
busy_pct() {
    local a b c d e f g h t1 i1 t2 i2
    read -r _ a b c d e f g h _ </proc/stat
    t1=$((a + b + c + d + e + f + g + h)) i1=$((d + e))
    sleep "$1"
    read -r _ a b c d e f g h _ </proc/stat
    t2=$((a + b + c + d + e + f + g + h)) i2=$((d + e))
    echo $((100 * ((t2 - t1) - (i2 - i1)) / ((t2 - t1) > 0 ? (t2 - t1) : 1)))
}

# quiet: before a timed run, waits (up to 5 minutes, then never again) for the machine to
# be idle, that is busy less than 20% over half a second while this benchmark does nothing,
# and records what it found: other work on the machine is the largest source of noise.
QUIET_GIVEN_UP='' QUIET_N=0
quiet() {
    local pct deadline=$((SECONDS + 300))
    pct=$(busy_pct 0.5)
    while [ "$pct" -ge 20 ] && [ -z "$QUIET_GIVEN_UP" ]; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            QUIET_GIVEN_UP=1
            say "warning: the machine stayed busy (${pct}% CPU) for 5 minutes; measuring anyway"
            break
        fi
        sleep 2
        pct=$(busy_pct 0.5)
    done
    QUIET_N=$((QUIET_N + 1))
    record background_busy "$PHASE" "$QUIET_N" "$pct"
}

# The peak resident set of walkeep and pgBackRest processes, sampled from /proc every 50 ms
# (catches background workers that /usr/bin/time does not see). Lines "comm kB".
sampler() {
    local out=$1 d comm key value rest
    declare -A peak=()
    while :; do
        for d in /proc/[0-9]*; do
            { read -r comm <"$d/comm"; } 2>/dev/null || continue
            case $comm in pgbackrest | walkeep*) ours "$d" || continue ;; *) continue ;; esac
            while { read -r key value rest; } 2>/dev/null; do
                if [ "$key" = VmHWM: ]; then
                    if [ "${value:-0}" -gt "${peak[$comm]:-0}" ]; then
                        peak[$comm]=$value
                        echo "$comm $value" >>"$out"
                    fi
                    break
                fi
            done 2>/dev/null <"$d/status" || true
        done
        sleep 0.05
    done
}
# ours /proc/PID: as in the runner, a walkeep program of this run or a pgBackRest started
# with this run's configuration.
ours() {
    local comm args=()
    { read -r comm <"$1/comm"; } 2>/dev/null || return 1
    case $comm in
        walkeep*) [ "$1/exe" -ef "$BIN/walkeep-archive" ] || [ "$1/exe" -ef "$BIN/walkeep-restore" ] \
            || [ "$1/exe" -ef "$BIN/walkeep" ] ;;
        pgbackrest)
            { mapfile -d '' -t args <"$1/cmdline"; } 2>/dev/null || return 1
            [[ "${args[*]}" == *"$WORK/"* ]] ;;
        *) return 1 ;;
    esac
}
start_sampler() {
    sampler "$1" &
    SAMPLER_PID=$!
}
stop_sampler() {
    [ -n "$SAMPLER_PID" ] || return 0
    kill "$SAMPLER_PID" 2>/dev/null || true
    wait "$SAMPLER_PID" 2>/dev/null || true
    SAMPLER_PID=''
}
# record_sampled FILE ROUND: the peaks the sampler saw, as mem_sampled rows (MiB).
record_sampled() {
    [ -s "$1" ] || return 0
    local comm
    for comm in $(cut -d' ' -f1 "$1" | sort -u); do
        record mem_sampled "$comm" "$2" \
            "$(awk -v c="$comm" '$1 == c && $2 > m { m = $2 } END { printf "%.1f", m / 1024 }' "$1")"
    done
}

# ---------------------------------------------------------------------------------------
# The bench cluster, the pgbench database and the WAL corpus
# ---------------------------------------------------------------------------------------

section "cluster, pgbench database (scale $SCALE) and WAL corpus"
PORT=$(free_port)
PORT2=$(free_port "$PORT")
[ "$(id -u)" -ne 0 ] || chown -R "$CLUSTER_USER:" "$WORK"
chmod 700 "$FAKEPG"
cd "$WORK"
as_cluster "$PGBIN/initdb" -D "$PGDATA" -U postgres --auth=trust --encoding=UTF8 --locale=C \
    --no-sync >"$WORK/logs/initdb.log" 2>&1
cat >>"$PGDATA/postgresql.conf" <<EOF

# --- walkeep bench ---
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$SOCK'
wal_level = replica
archive_mode = on
archive_command = ''        # set per measurement; empty keeps every segment .ready
max_wal_size = 64GB         # checkpoints only when the script asks for them
checkpoint_timeout = 1d
shared_buffers = 256MB
log_checkpoints = on
EOF
as_cluster "$PGBIN/pg_ctl" start -D "$PGDATA" -l "$WORK/logs/primary.log" -w -t 60 >/dev/null
CLUSTERS+=("$PGDATA")
CONNINFO="host=127.0.0.1 port=$PORT user=postgres dbname=postgres"

sql() {
    as_cluster "$PGBIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h "$SOCK" -p "${2:-$PORT}" \
        -U postgres -d postgres -c "$1"
}
pgbench() {
    as_cluster env PGOPTIONS='-c synchronous_commit=off' "$PGBIN/pgbench" -h "$SOCK" -p "$PORT" \
        -U postgres "$@" postgres >>"$WORK/logs/pgbench.log" 2>&1
}
ready_count() { compgen -G "$PGDATA/pg_wal/archive_status/*.ready" | wc -l; }

t=$SECONDS
pgbench -i -s "$SCALE" -q
DB_BYTES=$(sql "select pg_database_size('postgres')")
say "pgbench -i -s $SCALE: $(calc "$DB_BYTES / 1073741824") GiB database in $((SECONDS - t)) s"
if [ "$QUICK" = 0 ] && [ "$DB_BYTES" -lt 1073741824 ]; then
    die "the database is $DB_BYTES bytes, less than the 1 GiB the backup comparison needs; raise --scale"
fi

# Real WAL: pgbench's TPC-B-like load, with a checkpoint between bursts so that full-page
# images come and go as on a live server. Archiving is configured but empty, so every
# segment stays .ready: the corpus is copied from them, and they are the backlog.
RUN_START_SEG=$(sql "select pg_walfile_name(pg_current_wal_lsn())")
t=$SECONDS
while :; do
    pgbench -n -c 2 -j 2 -T "$WALGEN_SECONDS"
    sql "checkpoint"
    run_segments=$(compgen -G "$PGDATA/pg_wal/archive_status/*.ready" | sed 's|.*/||; s|\.ready$||' \
        | awk -v s="$RUN_START_SEG" '$0 > s' | wc -l)
    [ "$run_segments" -lt "$SEGMENTS" ] || [ "$(ready_count)" -lt "$BACKLOG" ] || break
done
LAST=$(sql "select pg_walfile_name(pg_switch_wal())")
deadline=$((SECONDS + 60))
until [ -f "$PGDATA/pg_wal/archive_status/$LAST.ready" ]; do
    [ "$SECONDS" -lt "$deadline" ] || die "segment $LAST never became .ready"
    sleep 0.1
done
compgen -G "$PGDATA/pg_wal/archive_status/*.ready" | sed 's|.*/||; s|\.ready$||' | sort >"$WORK/backlog.list"
awk -v s="$RUN_START_SEG" 'length($0) == 24 && $0 > s' "$WORK/backlog.list" | head -n "$SEGMENTS" \
    >"$WORK/corpus.list"
while read -r s; do
    cp "$PGDATA/pg_wal/$s" "$FAKEWAL/"
done <"$WORK/corpus.list"
cp "$PGDATA/global/pg_control" "$FAKEPG/global/"
cp "$PGDATA/PG_VERSION" "$FAKEPG/"
[ "$(id -u)" -ne 0 ] || chown -R "$CLUSTER_USER:" "$FAKEPG" "$WORK/corpus.list" "$WORK/backlog.list"
BACKLOG_N=$(wc -l <"$WORK/backlog.list")
SEG_BYTES=$(stat -c %s "$FAKEWAL/$(head -n1 "$WORK/corpus.list")")
CORPUS_N=$(wc -l <"$WORK/corpus.list")
CORPUS_BYTES=$((CORPUS_N * SEG_BYTES))
say "WAL: $BACKLOG_N segments .ready in $((SECONDS - t)) s of pgbench; corpus: $CORPUS_N segments" \
    "($(head -n1 "$WORK/corpus.list") .. $(tail -n1 "$WORK/corpus.list")), $((CORPUS_BYTES >> 20)) MiB"
[ "$CORPUS_N" -ge "$SEGMENTS" ] || die "only $CORPUS_N segments for the corpus"
# The segment after the corpus: what recovery asks for at the end of the archive.
LAST_CORPUS=$(tail -n1 "$WORK/corpus.list")
PER_LOG=$((4294967296 / SEG_BYTES))
NEXT_SEGNO=$((16#${LAST_CORPUS:8:8} * PER_LOG + 16#${LAST_CORPUS:16:8} + 1))
NEXT_SEG=$(printf '%s%08X%08X' "${LAST_CORPUS:0:8}" "$((NEXT_SEGNO / PER_LOG))" "$((NEXT_SEGNO % PER_LOG))")

# pgBackRest: a throwaway configuration; the stanza points at the bench cluster.
cat >"$PGBR/sync.conf" <<EOF
[global]
repo1-path=$PGBR/repo
repo1-retention-full=99
spool-path=$PGBR/spool
log-path=$WORK/logs/pgbackrest
lock-path=$PGBR/lock
log-level-console=warn
compress-type=zst
process-max=2
start-fast=y

[bench]
pg1-path=$PGDATA
pg1-port=$PORT
pg1-socket-path=$SOCK
EOF
sed 's/^process-max=2$/process-max=2\narchive-async=y/' "$PGBR/sync.conf" >"$PGBR/async.conf"
mkdir -p "$WORK/logs/pgbackrest" "$PGBR/lock"
# walkeep: the same repository without and with read-ahead and prefetch.
printf 'repo = "%s"\n' "$WK/repo" >"$WK/plain.conf"
printf 'repo = "%s"\nspool_dir = "%s"\narchive_readahead = %s\nrestore_prefetch = %s\n' \
    "$WK/repo" "$WK/spool" "$READAHEAD" "$PREFETCH" >"$WK/ra.conf"
if [ -n "$LEVEL" ]; then
    printf 'compress_level = %s\n' "$LEVEL" | tee -a "$WK/plain.conf" >>"$WK/ra.conf"
fi
[ "$(id -u)" -ne 0 ] || chown -R "$CLUSTER_USER:" "$PGBR" "$WK" "$WORK/logs" "$RAW" "$WORK/cp"

# ---------------------------------------------------------------------------------------
# Criterion: the per-segment pipeline on this corpus
# ---------------------------------------------------------------------------------------

if phase criterion; then
    section "criterion: the per-segment pipeline on the corpus (benches/pipeline.rs)" criterion
    # Read the corpus from a copy the invoking user owns (it is private to the cluster user).
    mkdir -p "$WORK/criterion-wal"
    while read -r s; do cp "$FAKEWAL/$s" "$WORK/criterion-wal/"; done <"$WORK/corpus.list"
    quiet
    (cd "$ROOT" && WALKEEP_BENCH_WAL=$WORK/criterion-wal WALKEEP_BENCH_SEGMENTS=8 \
        cargo bench --quiet --bench pipeline -- --output-format bencher) >"$WORK/logs/criterion.log" 2>&1 \
        || { tail -n 20 "$WORK/logs/criterion.log"; die "cargo bench failed"; }
    rm -rf "$WORK/criterion-wal"
    while read -r name ns; do
        record "crit_$name" criterion 1 "$(calc "$ns / 1e6")"
        say "$(printf '%-10s %8.2f ms per segment' "$name" "$(calc "$ns / 1e6")")"
    done < <(sed -n 's|^test segment ([^)]*)/\([^ ]*\) \.\.\. bench: *\([0-9,]*\) ns/iter.*|\1 \2|p' \
        "$WORK/logs/criterion.log" | tr -d , | tr / -)
    grep '^zstd level' "$WORK/logs/criterion.log" | sed 's/^/    /' || true
fi

# ---------------------------------------------------------------------------------------
# Archive and restore outside the server: one process per segment
# ---------------------------------------------------------------------------------------

ARCHIVE_TOOLS=(cp cp-fsync pgbr-sync pgbr-async walkeep walkeep-ra)
RESTORE_TOOLS=(cp pgbr-sync pgbr-async walkeep walkeep-pf)

# stored_pct TOOL: what the repository holds of the corpus, in % of its size.
stored_pct() {
    local bytes
    case $1 in
        cp*) bytes=$(bytes_of "$CPARCH") ;;
        pgbr*) bytes=$(bytes_of "$PGBR/repo/archive") ;;
        walkeep*) bytes=$(bytes_of "$WK/repo/wal") ;;
    esac
    calc "100 * $bytes / $2"
}

# record_archive TOOL ROUND FILE
record_archive() {
    local us ahead
    us=$(sum_col "$3" 2)
    record archive_mibps "$1" "$2" "$(calc "$CORPUS_BYTES / 1048576 / ($us / 1e6)")"
    record archive_ms "$1" "$2" "$(calc "$us / $CORPUS_N / 1000")"
    record archive_stored "$1" "$2" "$(stored_pct "$1" "$CORPUS_BYTES")"
    ahead=$(median_col "$3" 2 3 1)
    [ -z "$ahead" ] || record ahead_ms "$1" "$2" "$(calc "$ahead / 1000")"
    local served=''
    case $1 in
        pgbr-async | walkeep-ra) served="$(awk '$3 == 1' "$3" | wc -l) of $CORPUS_N calls found it pushed ahead" ;;
    esac
    say "$(printf '%-11s %7.1f MiB/s  %7.1f ms/segment  %s' "$1" \
        "$(calc "$CORPUS_BYTES / 1048576 / ($us / 1e6)")" "$(calc "$us / $CORPUS_N / 1000")" "$served")"
}

if phase archive; then
    section "archive: $CORPUS_N segments, one process per segment, $ROUNDS rounds" archive
    for ((r = 1; r <= ROUNDS; r++)); do
        say "round $r"
        for tool in $(rotate "$r" "${ARCHIVE_TOOLS[@]}"); do
            run prep "$tool"
            settle
            run archive "$tool" "$RAW/archive.$tool.$r"
            record_archive "$tool" "$r" "$RAW/archive.$tool.$r"
        done
        settle
        # A segment offered again (after a crash, PostgreSQL re-offers what it had not seen
        # acknowledged): both repositories hold the corpus now.
        for tool in walkeep pgbr-sync; do
            if [ -f "$(case $tool in pgbr*) echo "$PGBR" ;; *) echo "$WK" ;; esac)/complete" ]; then
                run dup "$tool" 8 "$RAW/dup.$tool.$r"
                record dup_ms "$tool" "$r" "$(calc "$(median_col "$RAW/dup.$tool.$r" 2) / 1000")"
            fi
        done
    done
    if ! cat "$RAW"/archive.walkeep-ra.* | awk '$3 == 1 { found = 1 } END { exit !found }'; then
        say "note: no walkeep-archive call was served by read-ahead: this build does not read ahead"
    fi
fi

if phase restore; then
    section "restore: $CORPUS_N segments, one process per segment, $ROUNDS rounds" restore
    for family in cp pgbr-sync walkeep; do
        if [ ! -f "$(case $family in cp) echo "$WORK/cp" ;; pgbr*) echo "$PGBR" ;; *) echo "$WK" ;; esac)/complete" ]; then
            say "filling the $family repository (not timed)"
            run prep "$family"
            run archive "$family" "$RAW/fill.$family"
        fi
    done
    for ((r = 1; r <= ROUNDS; r++)); do
        say "round $r"
        for tool in $(rotate "$r" "${RESTORE_TOOLS[@]}"); do
            run clear_spools
            settle
            run restore "$tool" "$RAW/restore.$tool.$r"
            us=$(sum_col "$RAW/restore.$tool.$r" 2)
            record restore_mibps "$tool" "$r" "$(calc "$CORPUS_BYTES / 1048576 / ($us / 1e6)")"
            record restore_ms "$tool" "$r" "$(calc "$us / $CORPUS_N / 1000")"
            say "$(printf '%-11s %7.1f MiB/s  %7.1f ms/segment' "$tool" \
                "$(calc "$CORPUS_BYTES / 1048576 / ($us / 1e6)")" "$(calc "$us / $CORPUS_N / 1000")")"
        done
        for tool in $(rotate "$r" "${RESTORE_TOOLS[@]}"); do
            run clear_spools
            settle
            run probe "$tool" "$NEXT_SEG" "$PROBES" "$RAW/probe-seg.$tool.$r"
            record probe_seg_ms "$tool" "$r" "$(calc "$(median_col "$RAW/probe-seg.$tool.$r" 2) / 1000")"
            run probe "$tool" 00000002.history "$PROBES" "$RAW/probe-hist.$tool.$r"
            record probe_hist_ms "$tool" "$r" "$(calc "$(median_col "$RAW/probe-hist.$tool.$r" 2) / 1000")"
        done
        run start 30 "$RAW/start.$r"
        record start_ms walkeep-archive "$r" "$(calc "$(median_col "$RAW/start.$r" 2) / 1000")"
    done
    settle
fi

# ---------------------------------------------------------------------------------------
# Peak memory, one untimed pass: /usr/bin/time -f %M around every call, and the /proc
# sampler for background workers
# ---------------------------------------------------------------------------------------

if phase archive || phase restore; then
    section "peak memory: one untimed pass with /usr/bin/time" memory
    start_sampler "$RAW/sampled.mem"
    if phase archive; then
        for tool in pgbr-sync pgbr-async walkeep walkeep-ra; do
            run prep "$tool"
            settle
            as_cluster env MEMFILE="$RAW/mem.archive.$tool" "$BIN/runner.sh" archive "$tool" "$RAW/memrun.$tool"
        done
    fi
    if phase restore; then
        for tool in pgbr-sync pgbr-async walkeep walkeep-pf; do
            if [ ! -f "$(case $tool in pgbr*) echo "$PGBR" ;; *) echo "$WK" ;; esac)/complete" ]; then
                run prep "$tool"
                run archive "${tool%-pf}" "$RAW/fill.$tool"
            fi
            run clear_spools
            settle
            as_cluster env MEMFILE="$RAW/mem.restore.$tool" "$BIN/runner.sh" restore "$tool" "$RAW/memrun.r.$tool"
        done
    fi
    settle
    stop_sampler
    for f in "$RAW"/mem.*; do
        [ -s "$f" ] || continue
        kind=${f#"$RAW"/mem.}
        peak_kb=$(grep -E '^[0-9]+$' "$f" | sort -g | tail -n1)
        record "mem_${kind%%.*}" "${kind#*.}" 1 "$(calc "$peak_kb / 1024")"
        say "$(printf '%-8s %-11s peak %6.1f MiB over %s calls' "${kind%%.*}" "${kind#*.}" \
            "$(calc "$peak_kb / 1024")" "$(grep -cE '^[0-9]+$' "$f")")"
    done
    record_sampled "$RAW/sampled.mem" mem
fi

# ---------------------------------------------------------------------------------------
# Drained by PostgreSQL's own archiver
# ---------------------------------------------------------------------------------------

DRAIN_TOOLS=(cp pgbr-sync pgbr-async walkeep walkeep-ra)
archive_command_for() {
    case $1 in
        cp) echo "test ! -f $CPARCH/%f && cp %p $CPARCH/%f" ;;
        pgbr-sync) echo "pgbackrest --config=$PGBR/sync.conf --stanza=bench archive-push %p" ;;
        pgbr-async | pgbr) echo "pgbackrest --config=$PGBR/async.conf --stanza=bench archive-push %p" ;;
        walkeep) echo "$BIN/walkeep-archive --config $WK/plain.conf %p %f" ;;
        walkeep-ra) echo "$BIN/walkeep-archive --config $WK/ra.conf %p %f" ;;
        pg_basebackup) echo "test ! -f $WORK/pitr-archive/%f && cp %p $WORK/pitr-archive/%f" ;;
    esac
}
set_archive_command() {
    sql "alter system set archive_command = '$1'" >/dev/null
    sql "select pg_reload_conf()" >/dev/null
}

if phase drain; then
    BACKLOG_BYTES=$((BACKLOG_N * SEG_BYTES))
    section "drain: PostgreSQL's archiver drains $BACKLOG_N .ready segments, $ROUNDS rounds" drain
    start_sampler "$RAW/sampled.drain"
    for ((r = 1; r <= ROUNDS; r++)); do
        say "round $r"
        for tool in $(rotate "$r" "${DRAIN_TOOLS[@]}"); do
            run prep "$tool"
            settle
            read -r archived0 failed0 <<<"$(sql "select archived_count, failed_count from pg_stat_archiver" | tr '|' ' ')"
            t0=${EPOCHREALTIME//[.,]/}
            set_archive_command "$(archive_command_for "$tool")"
            deadline=$((SECONDS + 3600))
            while compgen -G "$PGDATA/pg_wal/archive_status/*.ready" >/dev/null; do
                [ "$SECONDS" -lt "$deadline" ] || die "$tool did not drain the backlog within an hour"
                sleep 0.05
            done
            t1=${EPOCHREALTIME//[.,]/}
            set_archive_command ''
            sleep 1
            read -r archived1 failed1 <<<"$(sql "select archived_count, failed_count from pg_stat_archiver" | tr '|' ' ')"
            [ "$((archived1 - archived0))" -ge "$BACKLOG_N" ] \
                || die "$tool: the archiver reports $((archived1 - archived0)) archived, not $BACKLOG_N"
            secs=$(calc "($t1 - $t0) / 1e6")
            record drain_s "$tool" "$r" "$secs"
            record drain_mibps "$tool" "$r" "$(calc "$BACKLOG_BYTES / 1048576 / $secs")"
            record drain_stored "$tool" "$r" "$(stored_pct "$tool" "$BACKLOG_BYTES")"
            [ "$((failed1 - failed0))" -eq 0 ] || record drain_failures "$tool" "$r" "$((failed1 - failed0))"
            say "$(printf '%-11s %7.2f s to the last .done  %7.1f MiB/s  stored %5.1f%%  %s failed calls' \
                "$tool" "$secs" "$(calc "$BACKLOG_BYTES / 1048576 / $secs")" \
                "$(stored_pct "$tool" "$BACKLOG_BYTES")" "$((failed1 - failed0))")"
            run reset_backlog "$WORK/backlog.list"
        done
    done
    stop_sampler
    record_sampled "$RAW/sampled.drain" drain
fi

# ---------------------------------------------------------------------------------------
# Base backup and PITR restore
# ---------------------------------------------------------------------------------------

if phase backup; then
    section "backup and PITR: $(calc "$(sql "select pg_database_size('postgres')") / 1073741824") GiB database, $ROUNDS rounds" backup
    RESTORED=$WORK/restored
    BASEBACKUP=$WORK/basebackup
    mkdir -p "$WORK/pitr-archive" "$WORK/sock2"
    [ "$(id -u)" -ne 0 ] || chown "$CLUSTER_USER:" "$WORK/pitr-archive" "$WORK/sock2"
    sql "create table if not exists bench_pitr (run text, phase text)" >/dev/null
    # Earlier phases leave hundreds of segments in pg_wal; a checkpoint recycles them.
    run forget_backlog "$WORK/backlog.list"
    sql "checkpoint" >/dev/null
    timed() { # OUT_VAR MEMFILE COMMAND...: runs COMMAND as the cluster user, timed
        local __var=$1 mem=$2 t0 t1
        shift 2
        t0=${EPOCHREALTIME//[.,]/}
        if [ -n "$mem" ]; then
            as_cluster /usr/bin/time -f %M -o "$mem" "$@" >>"$WORK/logs/backup.log" 2>&1
        else
            as_cluster "$@" >>"$WORK/logs/backup.log" 2>&1
        fi
        t1=${EPOCHREALTIME//[.,]/}
        printf -v "$__var" '%s' "$(calc "($t1 - $t0) / 1e6")"
    }
    for ((r = 1; r <= ROUNDS; r++)); do
        say "round $r"
        for tool in $(rotate "$r" pg_basebackup pgbr walkeep); do
            id="r$r-$tool"
            backup_s='' restore_s='' stored=0
            case $tool in
                walkeep) run prep walkeep; archive_cmd=$(archive_command_for walkeep-ra) ;;
                pgbr) run prep pgbr; archive_cmd=$(archive_command_for pgbr) ;;
                pg_basebackup)
                    as_cluster rm -rf "$WORK/pitr-archive" "$BASEBACKUP"
                    as_cluster mkdir -m 700 "$WORK/pitr-archive"
                    archive_cmd=$(archive_command_for pg_basebackup) ;;
            esac
            set_archive_command "$archive_cmd"
            settle

            # The backup.
            case $tool in
                walkeep)
                    timed backup_s "$RAW/mem.backup.$r" "$BIN/walkeep" backup --config "$WK/ra.conf" \
                        --pgdata "$PGDATA" -d "$CONNINFO" --jobs 2
                    stored=$(bytes_of "$WK/repo/backups") ;;
                pgbr)
                    timed backup_s "$RAW/mem.pgbr-backup.$r" pgbackrest --config="$PGBR/async.conf" \
                        --stanza=bench --type=full backup
                    stored=$(bytes_of "$PGBR/repo/backup") ;;
                pg_basebackup)
                    timed backup_s '' "$PGBIN/pg_basebackup" -h "$SOCK" -p "$PORT" -U postgres \
                        -D "$BASEBACKUP" -Fp -Xstream -c fast
                    stored=$(bytes_of "$BASEBACKUP") ;;
            esac

            # Traffic after it, the target, a little more, all archived. (pgBackRest keeps
            # backup times in whole seconds and wants the target after the stop time.)
            sleep 1.5
            pgbench -n -c 2 -j 2 -t "$PITR_TX"
            sql "insert into bench_pitr values ('$id', 'before')" >/dev/null
            target=$(sql "select to_char(clock_timestamp() at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS.US+00')")
            sql "select pg_sleep(0.2)" >/dev/null
            sql "insert into bench_pitr values ('$id', 'after')" >/dev/null
            pgbench -n -c 1 -t 100
            last=$(sql "select pg_walfile_name(pg_switch_wal())")
            deadline=$((SECONDS + 300))
            until [ -f "$PGDATA/pg_wal/archive_status/$last.done" ]; do
                [ "$SECONDS" -lt "$deadline" ] || die "$tool: $last was not archived within 300 s"
                sleep 0.1
            done
            run clear_spools
            settle

            # The restore, set up for recovery to the target.
            as_cluster rm -rf "$RESTORED"
            case $tool in
                walkeep)
                    timed restore_s "$RAW/mem.restore-cmd.$r" "$BIN/walkeep" restore --config "$WK/ra.conf" \
                        --to "$RESTORED" --target-time "$target" --target-action promote --jobs 2 ;;
                pgbr)
                    as_cluster mkdir -m 700 "$RESTORED"
                    timed restore_s "$RAW/mem.pgbr-restore.$r" pgbackrest --config="$PGBR/async.conf" \
                        --stanza=bench "--pg1-path=$RESTORED" restore --type=time "--target=$target" \
                        --target-action=promote ;;
                pg_basebackup)
                    timed restore_s '' cp -a "$BASEBACKUP" "$RESTORED"
                    printf "restore_command = 'cp %s/%%f %%p'\nrecovery_target_time = '%s'\nrecovery_target_action = 'promote'\n" \
                        "$WORK/pitr-archive" "$target" | as_cluster tee -a "$RESTORED/postgresql.auto.conf" >/dev/null
                    as_cluster touch "$RESTORED/recovery.signal" ;;
            esac

            # Recovery: from pg_ctl start to promotion.
            CLUSTERS+=("$RESTORED")
            t0=${EPOCHREALTIME//[.,]/}
            as_cluster "$PGBIN/pg_ctl" start -D "$RESTORED" -l "$WORK/logs/restored.$id.log" -w -t 1800 \
                -o "-c port=$PORT2 -c archive_mode=off -c listen_addresses='' -c unix_socket_directories=$WORK/sock2" \
                >/dev/null
            deadline=$((SECONDS + 1800))
            until [ "$(as_cluster "$PGBIN/psql" -X -A -t -h "$WORK/sock2" -p "$PORT2" -U postgres -d postgres \
                -c 'select pg_is_in_recovery()' 2>/dev/null)" = f ]; do
                [ "$SECONDS" -lt "$deadline" ] || die "$tool: the restored cluster did not promote"
                sleep 0.05
            done
            t1=${EPOCHREALTIME//[.,]/}
            recovery_s=$(calc "($t1 - $t0) / 1e6")
            rows=$(as_cluster "$PGBIN/psql" -X -A -t -h "$WORK/sock2" -p "$PORT2" -U postgres -d postgres \
                -c "select string_agg(phase, ',' order by phase) from bench_pitr where run = '$id'")
            [ "$rows" = before ] || die "$tool: PITR gave rows '$rows' for run $id, expected just 'before'"
            as_cluster "$PGBIN/pg_ctl" stop -D "$RESTORED" -m immediate >/dev/null
            as_cluster rm -rf "$RESTORED"
            replayed=$(grep -c 'restored log file "[0-9A-F]\{24\}"' "$WORK/logs/restored.$id.log" || true)

            record backup_s "$tool" "$r" "$backup_s"
            record backup_mib "$tool" "$r" "$(calc "$stored / 1048576")"
            record restore_cmd_s "$tool" "$r" "$restore_s"
            record recovery_s "$tool" "$r" "$recovery_s"
            record pitr_s "$tool" "$r" "$(calc "$restore_s + $recovery_s")"
            record backup_pitr_s "$tool" "$r" "$(calc "$backup_s + $restore_s + $recovery_s")"
            record pitr_segments "$tool" "$r" "$replayed"
            say "$(printf '%-13s backup %5.1f s (%5.0f MiB)  restore %5.1f s  recovery to promotion %5.1f s (%s segments)' \
                "$tool" "$backup_s" "$(calc "$stored / 1048576")" "$restore_s" "$recovery_s" "$replayed")"
        done
    done
    set_archive_command ''
    for f in "$RAW"/mem.backup.* "$RAW"/mem.restore-cmd.* "$RAW"/mem.pgbr-backup.* "$RAW"/mem.pgbr-restore.*; do
        [ -s "$f" ] || continue
        kind=${f#"$RAW"/mem.}
        case ${kind%.*} in
            backup) m=mem_backup t=walkeep ;; restore-cmd) m=mem_restore_cmd t=walkeep ;;
            pgbr-backup) m=mem_backup t=pgbr ;; pgbr-restore) m=mem_restore_cmd t=pgbr ;;
        esac
        record "$m" "$t" "${kind##*.}" "$(calc "$(grep -E '^[0-9]+$' "$f" | tail -n1) / 1024")"
    done
fi

# ---------------------------------------------------------------------------------------
# The report: medians, min, max and every ratio against pgBackRest; the floors
# ---------------------------------------------------------------------------------------

section "report"
SUMMARY=$WORK/summary.tsv
# metric tool n median min max
sort -t "$(printf '\t')" -k1,1 -k2,2 -k4,4g "$RESULTS" | awk -F '\t' '
    function flush() {
        if (n == 0) return
        med = (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
        printf "%s\t%s\t%d\t%s\t%s\t%s\n", m, t, n, med, v[1], v[n]
    }
    $1 != m || $2 != t { flush(); m = $1; t = $2; n = 0 }
    { v[++n] = $4 }
    END { flush() }' >"$SUMMARY"

declare -A MED=()
while IFS=$'\t' read -r m t n med lo hi; do MED["$m|$t"]=$med; done <"$SUMMARY"

# metric: label, unit, direction (hi: more is better; lo: less is better), pgBackRest rows
METRICS=(
    "crit_sha256|criterion: SHA-256 of one segment|ms|lo|"
    "crit_walscan|criterion: record summary (walscan) of one segment|ms|lo|"
    "crit_encode-1|criterion: SHA-256 + zstd level 1 of one segment|ms|lo|"
    "crit_encode-3|criterion: SHA-256 + zstd level 3 of one segment|ms|lo|"
    "crit_archive|criterion: archive pipeline, one segment (floor)|ms|lo|"
    "crit_restore|criterion: restore pipeline, one segment (floor)|ms|lo|"
    "start_ms|process start (walkeep-archive --version)|ms|lo|"
    "archive_mibps|archive, one process per segment: throughput|MiB/s|hi|pgbr-sync pgbr-async"
    "archive_ms|archive, one process per segment: per segment|ms|lo|pgbr-sync pgbr-async"
    "archive_stored|archive: stored size|% of WAL|lo|pgbr-sync pgbr-async"
    "ahead_ms|archive call for a segment already pushed ahead (median call)|ms|lo|pgbr-async"
    "dup_ms|archive call for a segment already archived (offered again)|ms|lo|pgbr-sync"
    "restore_mibps|restore, one process per segment: throughput|MiB/s|hi|pgbr-sync pgbr-async"
    "restore_ms|restore, one process per segment: per segment|ms|lo|pgbr-sync pgbr-async"
    "probe_seg_ms|restore probe for a missing segment (median call)|ms|lo|pgbr-sync pgbr-async"
    "probe_hist_ms|restore probe for a missing .history file (median call)|ms|lo|pgbr-sync pgbr-async"
    "drain_s|PostgreSQL archiver drains the backlog: time to the last .done|s|lo|pgbr-sync pgbr-async"
    "drain_mibps|PostgreSQL archiver drains the backlog: throughput|MiB/s|hi|pgbr-sync pgbr-async"
    "drain_stored|PostgreSQL archiver drains the backlog: stored size|% of WAL|lo|pgbr-sync pgbr-async"
    "drain_failures|PostgreSQL archiver: failed archive_command calls|calls|lo|"
    "backup_s|base backup|s|lo|pgbr"
    "backup_mib|base backup: stored size|MiB|lo|pgbr"
    "restore_cmd_s|PITR: restore command (files in place, recovery set up)|s|lo|pgbr"
    "recovery_s|PITR: recovery, pg_ctl start to promotion|s|lo|pgbr"
    "pitr_s|PITR restore: restore command + recovery|s|lo|pgbr"
    "backup_pitr_s|backup + PITR restore|s|lo|pgbr"
    "pitr_segments|PITR: WAL segments restore_command delivered|segments|hi|"
    "mem_archive|peak memory, archive call (/usr/bin/time %M)|MiB|lo|pgbr-sync pgbr-async"
    "mem_restore|peak memory, restore call (/usr/bin/time %M)|MiB|lo|pgbr-sync pgbr-async"
    "mem_backup|peak memory, backup command|MiB|lo|pgbr"
    "mem_restore_cmd|peak memory, restore command|MiB|lo|pgbr"
    "mem_sampled|peak memory of any process by name, sampled from /proc|MiB|lo|pgbackrest"
    "background_busy|machine CPU busy just before a timed run, by phase (0.5 s sample)|%|lo|"
)

# ratio METRIC TOOL DIRECTION REF: how many times better than REF (above 1: better).
ratio() {
    local a=${MED["$1|$2"]:-} b=${MED["$1|$4"]:-}
    [ -n "$a" ] && [ -n "$b" ] || return 0
    if [ "$3" = hi ]; then
        awk -v a="$a" -v b="$b" 'BEGIN { if (b > 0) printf "%.2f", a / b }'
    else
        awk -v a="$a" -v b="$b" 'BEGIN { if (a > 0) printf "%.2f", b / a }'
    fi
}
fmt() { awk -v v="$1" 'BEGIN { if (v >= 100) printf "%.0f", v; else if (v >= 10) printf "%.1f", v; else printf "%.2f", v }'; }

REPORT=$WORK/report.md
{
    echo "| measurement | tool | median | min | max | unit | n | × pgBackRest (above 1: better) |"
    echo "|---|---|---:|---:|---:|---|---:|---|"
    for entry in "${METRICS[@]}"; do
        IFS='|' read -r m label unit dir refs <<<"$entry"
        while IFS=$'\t' read -r sm t n med lo hi; do
            [ "$sm" = "$m" ] || continue
            ratios=''
            for ref in $refs; do
                [ "$ref" != "$t" ] || continue
                x=$(ratio "$m" "$t" "$dir" "$ref")
                [ -z "$x" ] || ratios+="${ratios:+, }${x}× vs $ref"
            done
            printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$label" "$t" "$(fmt "$med")" \
                "$(fmt "$lo")" "$(fmt "$hi")" "$unit" "$n" "$ratios"
        done <"$SUMMARY"
    done
} >"$REPORT"

# The floors of the issue, each with its numbers.
floor() { # NAME CONDITION(awk) DETAIL
    local verdict
    if [ -z "$2" ]; then
        verdict="not measured"
    elif awk "BEGIN { exit !($2) }"; then
        verdict=MET
    else
        verdict="NOT MET"
    fi
    printf -- '- %s: **%s** (%s)\n' "$1" "$verdict" "$3"
}
m() { echo "${MED["$1|$2"]:-}"; }
both() { [ -n "$1" ] && [ -n "$2" ]; }
{
    busy_runs=$(awk -F '\t' '$1 == "background_busy" && $4 >= 20' "$RESULTS" | wc -l)
    if [ "$busy_runs" -gt 0 ]; then
        echo
        echo "**Warning**: other work kept the machine busy (20% CPU or more) just before" \
            "$busy_runs of $(awk -F '\t' '$1 == "background_busy"' "$RESULTS" | wc -l) timed runs;" \
            "their figures are unreliable."
    fi
    echo
    echo "Floors (medians of this run):"
    echo
    a=$(m archive_mibps walkeep) b=$(m archive_mibps pgbr-sync)
    both "$a" "$b" && floor "serial archive ≥ 2× pgBackRest synchronous zst" "$a >= 2 * $b" \
        "walkeep $(fmt "$a") MiB/s, pgBackRest $(fmt "$b") MiB/s: $(ratio archive_mibps walkeep hi pgbr-sync)×" \
        || floor "serial archive ≥ 2× pgBackRest synchronous zst" "" "archive phase not run"
    a=$(m archive_ms walkeep) c=$(m crit_archive criterion) s=$(m start_ms walkeep-archive)
    if both "$a" "$c" && [ -n "$s" ]; then
        floor "serial archive per segment ≤ 1.3× (criterion floor + process start)" "$a <= 1.3 * ($c + $s)" \
            "$(fmt "$a") ms per segment against $(fmt "$c") + $(fmt "$s") ms: $(calc "$a / ($c + $s)")×"
    else
        floor "serial archive per segment ≤ 1.3× (criterion floor + process start)" "" "needs the criterion, archive and restore phases"
    fi
    a=$(m drain_s walkeep-ra) b=$(m drain_s pgbr-async) sa=$(m drain_stored walkeep-ra) sb=$(m drain_stored pgbr-async)
    both "$a" "$b" && floor "archive drained by PostgreSQL with read-ahead ≥ 1.5× pgBackRest async (process-max 2), compression equal or better" \
        "$b >= 1.5 * $a && $sa <= $sb" \
        "walkeep $(fmt "$a") s, pgBackRest $(fmt "$b") s: $(ratio drain_s walkeep-ra lo pgbr-async)×; stored $(fmt "$sa")% against $(fmt "$sb")%" \
        || floor "archive drained by PostgreSQL with read-ahead ≥ 1.5× pgBackRest async" "" "drain phase not run"
    a=$(m restore_mibps walkeep) b=$(m restore_mibps pgbr-sync)
    both "$a" "$b" && floor "restore ≥ 2× pgBackRest archive-get, serially" "$a >= 2 * $b" \
        "walkeep $(fmt "$a") MiB/s, pgBackRest $(fmt "$b") MiB/s: $(ratio restore_mibps walkeep hi pgbr-sync)×" \
        || floor "restore ≥ 2× pgBackRest archive-get, serially" "" "restore phase not run"
    a=$(m restore_mibps walkeep-pf) c=$(m restore_mibps pgbr-async)
    both "$a" "$b" && floor "restore with prefetch ≥ 3× pgBackRest archive-get" "$a >= 3 * $b" \
        "walkeep $(fmt "$a") MiB/s: $(ratio restore_mibps walkeep-pf hi pgbr-sync)× pgBackRest synchronous, $(ratio restore_mibps walkeep-pf hi pgbr-async)× asynchronous ($(fmt "${c:-0}") MiB/s)" \
        || floor "restore with prefetch ≥ 3× pgBackRest archive-get" "" "restore phase not run"
    for t in walkeep walkeep-pf; do
        a=$(m probe_seg_ms "$t") b=$(m probe_hist_ms "$t")
        both "$a" "$b" && floor "probe for a missing segment or .history file < 5 ms ($t)" "$a < 5 && $b < 5" \
            "segment $(fmt "$a") ms, .history $(fmt "$b") ms" \
            || floor "probe for a missing segment or .history file < 5 ms ($t)" "" "restore phase not run"
    done
    a=$(m ahead_ms walkeep-ra)
    if [ -n "$a" ]; then
        floor "call for a segment already pushed ahead < 3 ms" "$a < 3" "walkeep $(fmt "$a") ms; pgBackRest async $(fmt "$(m ahead_ms pgbr-async)") ms"
    elif phase archive; then
        floor "call for a segment already pushed ahead < 3 ms" "0" "no walkeep-archive call was served by read-ahead: this build does not read ahead"
    else
        floor "call for a segment already pushed ahead < 3 ms" "" "archive phase not run"
    fi
    worst=$(awk -F '\t' '$1 ~ /^mem_/ && $2 ~ /^(walkeep|walkeep-ra|walkeep-pf|walkeep-archive|walkeep-restore)$/ && $6 > w { w = $6; what = $1 " " $2 } END { if (w) printf "%s %s", w, what }' "$SUMMARY")
    if [ -n "$worst" ]; then
        floor "peak memory of each binary < 64 MiB" "${worst%% *} < 64" "largest: $(fmt "${worst%% *}") MiB (${worst#* })"
    else
        floor "peak memory of each binary < 64 MiB" "" "no memory measured"
    fi
    a=$(m backup_s walkeep) b=$(m backup_s pgbr) c=$(m pitr_s walkeep) d=$(m pitr_s pgbr)
    if both "$a" "$b" && both "$c" "$d"; then
        floor "backup ≥ 1.5× pgBackRest (process-max 2)" "$b >= 1.5 * $a" \
            "walkeep $(fmt "$a") s, pgBackRest $(fmt "$b") s: $(ratio backup_s walkeep lo pgbr)×"
        floor "PITR restore ≥ 1.5× pgBackRest (process-max 2)" "$d >= 1.5 * $c" \
            "walkeep $(fmt "$c") s, pgBackRest $(fmt "$d") s: $(ratio pitr_s walkeep lo pgbr)×"
    else
        floor "backup and PITR restore ≥ 1.5× pgBackRest" "" "backup phase not run"
    fi
} >>"$REPORT"

{
    echo "Machine: $(nproc) cores, $(sed -n 's/^model name[^:]*: //p' /proc/cpuinfo | head -n1);" \
        "$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) memory;" \
        "$(findmnt -n -T "$WORK" -o FSTYPE,SOURCE | tr -s ' ') for the work directory; kernel $(uname -r)"
    echo "Software: $("$PGBIN/postgres" --version); $(pgbackrest version); $("$BIN/walkeep" --version)" \
        "($(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo 'no git'))"
    echo "Corpus: $CORPUS_N segments of $((SEG_BYTES >> 20)) MiB from pgbench; backlog $BACKLOG_N segments;" \
        "database $(calc "$DB_BYTES / 1073741824") GiB (pgbench scale $SCALE); $ROUNDS rounds;" \
        "read-ahead $READAHEAD, prefetch $PREFETCH, walkeep compress_level ${LEVEL:-default}"
    echo
    cat "$REPORT"
} >"$WORK/report.full.md"
echo
cat "$WORK/report.full.md"
if [ -n "$OUT_DIR" ]; then
    mkdir -p "$OUT_DIR"
    cp "$RESULTS" "$SUMMARY" "$OUT_DIR/"
    cp "$WORK/report.full.md" "$OUT_DIR/report.md"
    cp -r "$RAW" "$OUT_DIR/raw"
    say "results written to $OUT_DIR"
fi
STEP="done"
printf '\n%sdone in %d s%s\n' "$BOLD" "$((SECONDS - BENCH_START))" "$RESET"
