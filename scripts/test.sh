#!/usr/bin/env bash
# The test suite, as CI runs it: formatting, lints, the feature builds that cannot run here, then
# every test. Tests that need a tool (losetup, root) fail when CI=true and the tool is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
jobs="-j$(nproc)"

step() { printf '\n=== %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy $jobs --workspace --all-targets -- -D warnings

step "blockstore builds without glommio (trait and format need no backend)"
cargo check $jobs -p blockstore --no-default-features

step "SPDK backend type-checks (cargo check --features spdk; runs in hw-tests/ where SPDK is)"
cargo check $jobs -p blockstore --features spdk --all-targets

step "RDMA transport type-checks (cargo check --features rdma; runs in hw-tests/rdma where a device is)"
cargo check $jobs -p dataplane --features rdma --all-targets
cargo check $jobs --features rdma

step "tests (crash suite: ${CAIRN_CRASH_SEEDS:-1000} seeds)"
cargo test $jobs --workspace

step "fuzz smoke: every cargo-fuzz target for ${FUZZ_SECONDS:-20} s"
bash scripts/fuzz-smoke.sh
