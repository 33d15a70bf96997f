#!/usr/bin/env bash
# Installs every Debian package that Cairn's build, tests and benchmarks need. Idempotent; run as
# root on Debian bookworm (the Rust toolchain itself comes from rustup and must already be there).
set -euo pipefail

packages=(
  build-essential pkg-config    # cc for glommio's bundled liburing and other -sys crates
  protobuf-compiler             # protoc for the control-plane schema (proto/)
  util-linux                    # losetup: raw block device tests on loop devices
  fio                           # perf/ baselines (io_uring, O_DIRECT) and, later, NBD workloads
  qemu-utils                    # qemu-img: real-client round trips
  libisal-dev                   # ISA-L erasure coding and crc (data plane)
  nbdkit libnbd-bin             # NBD peer for benchmarks, nbdinfo client
  libiscsi-bin                  # iscsi-test-cu conformance suite and iscsi-perf
  iptables                      # partitions in the multi-node control-plane tests
  tgt                           # tgtd/tgtadm: the iSCSI target Cairn's is compared against
  libibverbs-dev librdmacm-dev  # rdma-core headers and .pc files: the RDMA transport (feature rdma)
  libclang-dev                  # bindgen in rdma-sys's build script
  rdma-core ibverbs-utils       # rdma link / ibv_devices for hw-tests/rdma (soft-RoCE set-up)
)

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (apt-get install)" >&2
  exit 1
fi

missing=()
for p in "${packages[@]}"; do
  [[ "$p" == \#* ]] && continue
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup.sh: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "setup.sh: all ${#packages[@]} packages already installed"
fi

for tool in cargo rustc protoc fio losetup qemu-img; do
  command -v "$tool" >/dev/null || { echo "setup.sh: $tool is still missing" >&2; exit 1; }
done
cargo fmt --version >/dev/null && cargo clippy --version >/dev/null || {
  echo "setup.sh: rustfmt and clippy are needed (rustup component add rustfmt clippy)" >&2
  exit 1
}
echo "setup.sh: ready ($(cargo --version), $(protoc --version), $(fio --version))"
