#!/usr/bin/env bash
# Runs the SPDK backend's hardware test (blockstore/src/spdk/tests.rs) against malloc bdevs.
#
# Exit status: 0 passed, 77 skipped (SPDK or huge pages missing; the automake convention), any
# other value failed. Usually needs root (huge pages, /var/tmp sockets of SPDK's config loader).
#
# Environment:
#   PKG_CONFIG_PATH     must reach SPDK's .pc files, e.g. <spdk>/build/lib/pkgconfig
#   CAIRN_SPDK_HUGEDIR  hugetlbfs mount to use (default: DPDK picks one)
#   CAIRN_SPDK_MEM_MB   huge page memory to reserve up front (default: grow on demand)
#   CARGO_TARGET_DIR    as usual
set -euo pipefail

SKIP=77
NEED_HUGE_MB=256
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

if ! command -v pkg-config >/dev/null 2>&1 || ! pkg-config --exists spdk_bdev; then
    echo "SKIP: SPDK is not installed (pkg-config spdk_bdev not found)"
    echo "      build SPDK with ./configure --with-shared and set PKG_CONFIG_PATH=<spdk>/build/lib/pkgconfig"
    exit "$SKIP"
fi
echo "SPDK $(pkg-config --modversion spdk_bdev) $(pkg-config --variable=libdir spdk_bdev 2>/dev/null || true)"

huge_total=$(awk '/^HugePages_Total:/ { print $2 }' /proc/meminfo)
huge_free=$(awk '/^HugePages_Free:/ { print $2 }' /proc/meminfo)
huge_kb=$(awk '/^Hugepagesize:/ { print $2 }' /proc/meminfo)
if [ "${huge_total:-0}" -eq 0 ]; then
    echo "SKIP: no huge pages reserved (as root: echo 256 > /proc/sys/vm/nr_hugepages)"
    exit "$SKIP"
fi
free_mb=$(( ${huge_free:-0} * ${huge_kb:-0} / 1024 ))
if [ "$free_mb" -lt "$NEED_HUGE_MB" ]; then
    echo "SKIP: only ${free_mb} MiB of huge pages free, the test needs ${NEED_HUGE_MB} MiB"
    exit "$SKIP"
fi
if ! awk '$3 == "hugetlbfs" { found = 1 } END { exit !found }' /proc/mounts; then
    echo "SKIP: no hugetlbfs mounted (as root: mkdir -p /dev/hugepages && mount -t hugetlbfs nodev /dev/hugepages)"
    exit "$SKIP"
fi

cd "$repo"
# One test thread: the SPDK environment is per process and the test initialises it once.
exec cargo test -p blockstore --features spdk --lib -- --ignored --exact \
    spdk::tests::spdk_malloc_round_trip --test-threads=1 --nocapture
