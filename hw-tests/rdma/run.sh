#!/usr/bin/env bash
# Runs the RDMA transport's loopback test (dataplane/src/transport/rdma.rs, `rdma_loopback`):
# a server and a client on one core talk over RC queue pairs through a real RDMA NIC or a
# soft-RoCE (rxe) link: round trips of 0 B to 100 KB, 200 pipelined calls, a too-large refusal.
#
# Exit status: 0 passed, 77 skipped (no RDMA device; the automake convention), anything else
# failed. Prints "SKIPPED: no RDMA device" when there is none.
#
# Environment:
#   CAIRN_RDMA_ADDR     IP address on the RDMA device to use (default: the first IPv4 address of
#                       the netdev under the first RDMA link)
#   CAIRN_RDMA_NETDEV   netdev to put a soft-RoCE link on when no RDMA device exists and we are
#                       root (default: the interface of the default route; `lo` does not work)
#   CAIRN_RDMA_NO_RXE=1 never create a soft-RoCE link
#   CARGO_TARGET_DIR    as usual
set -euo pipefail

SKIP=77
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

devices() { ls /sys/class/infiniband 2>/dev/null || true; }

if ! pkg-config --exists libibverbs librdmacm 2>/dev/null; then
    echo "SKIPPED: no RDMA device tested: rdma-core development files are missing"
    echo "         (apt-get install libibverbs-dev librdmacm-dev libclang-dev; see scripts/setup.sh)"
    exit "$SKIP"
fi

created=""
cleanup() {
    if [ -n "$created" ]; then
        rdma link delete "$created" >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

if [ -z "$(devices)" ] && [ "${CAIRN_RDMA_NO_RXE:-0}" != 1 ] && [ "$(id -u)" -eq 0 ] \
    && command -v rdma >/dev/null 2>&1; then
    netdev="${CAIRN_RDMA_NETDEV:-$(ip -o route show default 2>/dev/null | awk '{ print $5; exit }')}"
    if [ -n "$netdev" ]; then
        command -v modprobe >/dev/null 2>&1 && modprobe rdma_rxe 2>/dev/null || true
        if rdma link add cairn_rxe0 type rxe netdev "$netdev" 2>/dev/null; then
            created=cairn_rxe0
            echo "created soft-RoCE link cairn_rxe0 on $netdev"
        fi
    fi
fi

if [ -z "$(devices)" ]; then
    echo "SKIPPED: no RDMA device (/sys/class/infiniband is empty; no NIC, and no soft-RoCE link"
    echo "         could be made: as root, 'modprobe rdma_rxe && rdma link add rxe0 type rxe"
    echo "         netdev <if>' needs a kernel with CONFIG_RDMA_RXE)"
    exit "$SKIP"
fi
echo "RDMA devices: $(devices | tr '\n' ' ')"

addr="${CAIRN_RDMA_ADDR:-}"
if [ -z "$addr" ]; then
    netdev=$(rdma link show 2>/dev/null | awk '{ for (i = 1; i < NF; i++) if ($i == "netdev") { print $(i + 1); exit } }')
    if [ -n "$netdev" ]; then
        addr=$(ip -o -4 addr show dev "$netdev" 2>/dev/null | awk '{ split($4, a, "/"); print a[1]; exit }')
    fi
fi
if [ -z "$addr" ]; then
    echo "SKIPPED: no RDMA device with an IPv4 address found; set CAIRN_RDMA_ADDR"
    exit "$SKIP"
fi
echo "RDMA address: $addr"

cd "$repo"
CAIRN_RDMA_ADDR="$addr" cargo test -p dataplane --features rdma --lib -- --ignored --exact \
    transport::rdma::tests::rdma_loopback --test-threads=1 --nocapture
