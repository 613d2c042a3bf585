#!/usr/bin/env bash
# The scheduled backup: `walkeep backup`, then `walkeep expire`, then, if asked,
# `walkeep verify`. Run daily by deploy/systemd/walkeep-backup.timer or
# deploy/cron/walkeep-backup (scripts/install.sh installs it as walkeep-scheduled-backup),
# as the OS user that owns the repository and can read the data directory (postgres).
#
#   walkeep-scheduled-backup [--config FILE] [--keep N] [--keep-days D] [--verify]
#                            [--log FILE] [--walkeep PATH]
#
# Options (an option wins over the environment variable after it):
#   --config FILE   WALKEEP_CONFIG     walkeep's config file: repo, pgdata, conninfo
#                                      (default: walkeep's own, /etc/walkeep/walkeep.toml)
#   --keep N        WALKEEP_KEEP       keep the newest N backups (default 7)
#   --keep-days D   WALKEEP_KEEP_DAYS  keep every point of the last D days restorable
#                                      (default 14)
#   --verify        WALKEEP_VERIFY=1   re-read and check the whole repository afterwards;
#                                      reads every object, so it takes long on a big one
#   --log FILE      WALKEEP_LOG        append the log to FILE instead of stderr; a failure
#                                      is reported on stderr as well (cron mails it)
#   --walkeep PATH  WALKEEP_BIN        the walkeep program (default: the one next to this
#                                      script, else the one on PATH)
#
# Each line logged starts with the local time. Exit status: 0 when every step succeeded;
# 1 when one failed (the log names it and quotes walkeep's error); 2 on a usage error.
set -euo pipefail

exec </dev/null

CONFIG=${WALKEEP_CONFIG:-}
KEEP=${WALKEEP_KEEP:-7}
KEEP_DAYS=${WALKEEP_KEEP_DAYS:-14}
VERIFY=${WALKEEP_VERIFY:-0}
LOG=${WALKEEP_LOG:-}
WALKEEP=${WALKEEP_BIN:-}

usage_error() {
    printf 'walkeep-scheduled-backup: %s (see the top of %s)\n' "$1" "$0" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --verify) VERIFY=1; shift; continue ;;
        -h | --help) sed -n '2,/^set -euo/{/^set/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
    esac
    case "$1" in
        --config | --keep | --keep-days | --log | --walkeep) [ $# -ge 2 ] || usage_error "option $1 needs a value" ;;
        *) usage_error "unknown option $1" ;;
    esac
    case "$1" in
        --config) CONFIG=$2 ;;
        --keep) KEEP=$2 ;;
        --keep-days) KEEP_DAYS=$2 ;;
        --log) LOG=$2 ;;
        --walkeep) WALKEEP=$2 ;;
        *) usage_error "unknown option $1" ;;
    esac
    shift 2
done
[[ "$KEEP" =~ ^[1-9][0-9]*$ ]] || usage_error "--keep takes a whole number of backups, at least 1"
[[ "$KEEP_DAYS" =~ ^[0-9]+$ ]] || usage_error "--keep-days takes a whole number of days"
[[ "$VERIFY" =~ ^[01]$ ]] || usage_error "WALKEEP_VERIFY must be 0 or 1"

# ---------------------------------------------------------------------------------------
# Logging: fd 3 is the log, stderr or the --log file
# ---------------------------------------------------------------------------------------

if [ -n "$LOG" ]; then
    mkdir -p "$(dirname "$LOG")"
    exec 3>>"$LOG"
else
    exec 3>&2
fi

stamp() { printf '%(%Y-%m-%dT%H:%M:%S%z)T' -1; }

log() { printf '%s walkeep-scheduled-backup[%d]: %s\n' "$(stamp)" "$$" "$*" >&3; }

# prefixed: copies standard input to the log, each line time-stamped.
prefixed() {
    local line
    while IFS= read -r line || [ -n "$line" ]; do
        printf '%s   %s\n' "$(stamp)" "$line" >&3
    done
}

fail() {
    log "FAILED: $*"
    if [ -n "$LOG" ]; then
        printf 'walkeep-scheduled-backup: FAILED: %s (log: %s)\n' "$*" "$LOG" >&2
    fi
    exit 1
}

# ---------------------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------------------

if [ -z "$WALKEEP" ]; then
    WALKEEP=$(dirname "$0")/walkeep
    [ -x "$WALKEEP" ] || WALKEEP=$(command -v walkeep || true)
fi
if [ -z "$WALKEEP" ] || [ ! -x "$WALKEEP" ]; then
    fail "walkeep not found: install it, or pass --walkeep"
fi

config_args=()
[ -z "$CONFIG" ] || config_args=(--config "$CONFIG")

# Holds the output of the running step, so that a failure can quote walkeep's error.
OUTPUT=$(mktemp "${TMPDIR:-/tmp}/walkeep-scheduled-backup.XXXXXX")
trap 'rm -f "$OUTPUT"' EXIT

# step NAME ARGS...: runs `walkeep ARGS...`, its output logged; fails the run if it fails.
step() {
    local name=$1 began=$SECONDS status=0 error
    shift
    log "$name: walkeep $*"
    "$WALKEEP" "$@" 2>&1 | tee "$OUTPUT" | prefixed || status=$?
    if [ "$status" -ne 0 ]; then
        error=$(grep -E 'ERROR|error' "$OUTPUT" | tail -n 1 | sed -E 's/^[[:space:]]*(ERROR[[:space:]]*)?//')
        fail "$name: walkeep exited with status $status after $((SECONDS - began)) s${error:+: $error}"
    fi
    log "$name: ok in $((SECONDS - began)) s"
}

log "starting: backup, expire --keep $KEEP --keep-days $KEEP_DAYS$([ "$VERIFY" = 1 ] && echo ', verify')"
step backup backup "${config_args[@]}"
step expire expire "${config_args[@]}" --keep "$KEEP" --keep-days "$KEEP_DAYS"
if [ "$VERIFY" = 1 ]; then
    step verify verify "${config_args[@]}"
fi
log "finished"
