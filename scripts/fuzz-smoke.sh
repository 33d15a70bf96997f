#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ (nbd_request, iscsi_pdu, transport_frame, and any added to
# fuzz/Cargo.toml) for ${FUZZ_SECONDS:-20} seconds each; fails on the first
# crash (the reproducer is left in fuzz/artifacts/<target>/). Installs cargo-fuzz if missing.
# Needs the nightly toolchain (`rustup toolchain install nightly`).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${FUZZ_SECONDS:-20}"
export CARGO_TERM_COLOR=never
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-$(nproc)}"

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz-smoke: the nightly toolchain is missing (rustup toolchain install nightly)" >&2
  exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz-smoke: installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi

targets=$(cargo +nightly fuzz list)
if [ -z "$targets" ]; then
  echo "fuzz-smoke: no fuzz targets found" >&2
  exit 1
fi
for target in $targets; do
  printf '\n=== fuzz %s for %s s\n' "$target" "$seconds"
  cargo +nightly fuzz run "$target" -- -max_total_time="$seconds" -print_final_stats=1
done
echo "fuzz-smoke: all targets ran ${seconds} s without a crash"
