#!/usr/bin/env bash
# Deploys version VERSION of the application with a restore point just before it, so that a
# bad release can be rolled back together with its data (docs/RUNBOOK.md, procedure 6).
#
#   deploy/compose/release.sh VERSION
#
# In order, stopping at the first failure:
#   1. pulls the application image APP_IMAGE:VERSION (a missing tag fails here, before
#      anything changed);
#   2. stops the application, so no write lands between the restore point and the release;
#   3. `walkeep mark --switch-wal before-VERSION-<UTC time>` in the db service: a named
#      restore point, archived at once. If it fails, the old version is started again and
#      nothing is deployed;
#   4. records the release in releases.log beside this script (time, version, previous
#      version, restore point: what a rollback needs) and sets APP_VERSION in .env;
#   5. starts VERSION.
#
# Exit status: 0 deployed; 1 failed (the message says what was left running); 2 usage.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
exec </dev/null

die() {
    printf 'release: %s\n' "$*" >&2
    exit 1
}

[ $# -eq 1 ] || { echo "usage: $0 VERSION" >&2; exit 2; }
VERSION=$1
# A tag Docker accepts, short enough for a restore point name (63 bytes at most).
[[ "$VERSION" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,39}$ ]] || { echo "release: $VERSION is not an image tag" >&2; exit 2; }
[ -f .env ] || die ".env not found: copy .env.example to .env and fill it in (README.md)"
PREVIOUS=$(sed -n 's/^APP_VERSION=//p' .env | tail -n 1)
[ -n "$PREVIOUS" ] || die ".env sets no APP_VERSION"
[ "$PREVIOUS" != "$VERSION" ] || die "APP_VERSION is already $VERSION"
POINT=before-$VERSION-$(date -u +%Y%m%dT%H%M%SZ)

echo "release: pulling the application image, version $VERSION"
APP_VERSION=$VERSION docker compose pull app

echo "release: stopping version $PREVIOUS"
docker compose stop app

echo "release: restore point $POINT"
if ! docker compose exec -T -u postgres db walkeep mark --switch-wal "$POINT"; then
    docker compose start app || true
    die "no restore point could be made, so $VERSION was not deployed; $PREVIOUS is running again"
fi

printf '%s\t%s\t%s\t%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$VERSION" "$PREVIOUS" "$POINT" >>releases.log
sed -i "s/^APP_VERSION=.*/APP_VERSION=$VERSION/" .env

echo "release: starting version $VERSION"
docker compose up -d app || die "version $VERSION did not start; to go back: docs/RUNBOOK.md, procedure 6, RESTORE_POINT=$POINT PREVIOUS_VERSION=$PREVIOUS"

echo "release: $VERSION is deployed. A rollback with its data goes back to restore point $POINT"
echo "release: and version $PREVIOUS (docs/RUNBOOK.md, procedure 6)."
