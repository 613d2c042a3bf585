#!/usr/bin/env bash
# The backup service's main process: runs walkeep-scheduled-backup (backup, expire,
# verify) at start and then every BACKUP_INTERVAL seconds. A failed run is logged
# (docker compose logs backup), makes the service unhealthy (docker compose ps) until a
# run succeeds, and is retried after BACKUP_RETRY_INTERVAL seconds.
#
#   walkeep-backup-loop [ARGS...]   the loop; ARGS go to walkeep-scheduled-backup
#   walkeep-backup-loop --healthy   the healthcheck: exit 0 if and only if the last run
#                                   succeeded, less than BACKUP_INTERVAL + 2 h ago
set -euo pipefail

INTERVAL=${BACKUP_INTERVAL:-86400}
RETRY=${BACKUP_RETRY_INTERVAL:-3600}
OK_FILE=/tmp/walkeep-backup-ok

if [ "${1:-}" = --healthy ]; then
    [ -f "$OK_FILE" ] || exit 1
    [ $(($(date +%s) - $(stat -c %Y "$OK_FILE"))) -le $((INTERVAL + 7200)) ]
    exit
fi

trap 'exit 0' TERM INT
while :; do
    if walkeep-scheduled-backup "$@"; then
        touch "$OK_FILE"
        pause=$INTERVAL
    else
        rm -f "$OK_FILE"
        pause=$RETRY
        echo "walkeep-backup-loop: the scheduled backup FAILED; next try in $pause s" >&2
    fi
    # In the background, so that docker stop's SIGTERM ends the wait at once.
    sleep "$pause" &
    wait $!
done
