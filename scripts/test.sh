#!/usr/bin/env bash
# Runs the whole test suite, as the README documents it: formatting, lints, then every
# target's tests, integration tests against real PostgreSQL 15 clusters (and a real
# S3-compatible server for the object-storage tests) included. Installs what is missing
# first when run as root (see scripts/prerequisites.sh).
#
# Two test threads at a time: the machines have two cores and each cluster is heavy.
# RUST_TEST_THREADS, not `-- --test-threads=2`: cargo passes arguments after `--` to every
# target, and criterion benchmarks (run once each by `cargo test`) reject that flag.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

WALKEEP_NEED_WEED=1
# shellcheck source=scripts/prerequisites.sh
. scripts/prerequisites.sh

cargo fmt --check
cargo clippy --all-targets -- -D warnings
RUST_TEST_THREADS="${RUST_TEST_THREADS:-2}" cargo test --all-targets
