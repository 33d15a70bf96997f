# Helpers shared by the side-by-side frontend benchmarks (perf/nbd.sh, perf/iscsi.sh). Sourced,
# not run. The sourcing script sets `script` (its name, for messages), the variables it uses
# (RUNTIME, SETTLE_MAX, KEEP_FILES, VDISK_SIZE, CORES) and `set -euo pipefail`, then calls
# `lib_init`, which builds cairn, makes the scratch directory and installs the cleanup trap.
#
# Processes the script starts are appended to `pids` and stopped on exit (TERM, then KILL);
# files and directories appended to `paths` are removed (unless KEEP_FILES=1); `cleanups` holds
# extra commands run first (tgtd shutdown, loop-device detach).

die() { echo "${script:-perf}: $*" >&2; exit 1; }

paths=()     # data directories and files to remove
pids=()      # servers we started
cleanups=()  # commands to run on exit, before the processes are stopped

lib_cleanup() {
  local p c
  for c in "${cleanups[@]}"; do eval "$c" >/dev/null 2>&1 || true; done
  for p in "${pids[@]}"; do
    if kill -0 "$p" 2>/dev/null; then
      kill -TERM "$p" 2>/dev/null || true
      for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$p" 2>/dev/null || true
    fi
  done
  if [[ "${KEEP_FILES:-0}" != 1 ]]; then
    for p in "${paths[@]}"; do rm -rf "$p"; done
  fi
  [[ -n "${work:-}" ]] && rm -rf "$work"
}

# Builds the release binary (sets `bin`, `dirty`), makes `work` and installs the traps.
lib_init() {
  echo "== building cairn (release)" >&2
  cargo build --release -j2 --bin cairn >&2
  bin="${CARGO_TARGET_DIR:-$root/target}/release/cairn"
  [[ -x "$bin" ]] || die "no binary at $bin"
  # Others may be editing the tree: record what the binary was built from.
  dirty="$(git status --porcelain -- . ':!perf' 2>/dev/null | awk '{print $2}' | tr '\n' ' ')"
  built_from="$(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- . ':!perf' 2>/dev/null || echo ' + uncommitted changes')"
  work="$(mktemp -d)"
  trap lib_cleanup EXIT
  trap 'exit 130' INT TERM
  hz="$(getconf CLK_TCK)"
}

# CPU busy share of the whole machine over 2 s: other tenants make every number noisier.
cpu_busy() {
  python3 - <<'PY'
import time
def snap():
    v = list(map(int, open('/proc/stat').readline().split()[1:]))
    return sum(v), v[3] + v[4]
t0, i0 = snap(); time.sleep(2); t1, i1 = snap()
print(f"{100 * (1 - (i1 - i0) / max(1, t1 - t0)):.0f}%")
PY
}

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }  # utime + stime of every thread

free_port() {
  local p
  for _ in $(seq 200); do
    p=$((20000 + RANDOM % 20000))
    ss -Htln "sport = :$p" | grep -q . || { echo "$p"; return; }
  done
  die "no free TCP port"
}

wait_port() { # port pid
  for _ in $(seq 300); do
    ss -Htln "sport = :$1" | grep -q . && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# Waits until process $1 uses less than 2 % of a core over 1 s (a node's drain has finished);
# prints the seconds waited.
settle() {
  local pid=$1 start=$SECONDS a b
  while (( SECONDS - start < SETTLE_MAX )); do
    a=$(ticks "$pid"); sleep 1; b=$(ticks "$pid")
    (( (b - a) * 100 < 2 * hz )) && break
  done
  echo $((SECONDS - start))
}

# fio job -> "iops p99_us ios client_cpu_us_per_io" (fio's own user + system CPU); server CPU
# is measured by the caller. FIO names the binary
# (default: fio on PATH).
run_fio() { # rw qd args...
  local rw=$1 qd=$2; shift 2
  "${FIO:-fio}" --name="$rw-qd$qd" --size="$fio_size" --bs=4k --rw="$rw" --iodepth="$qd" \
    --runtime="$RUNTIME" --time_based --norandommap --randrepeat=0 --lat_percentiles=1 \
    "$@" --output-format=json --output="$work/fio.json" >"$work/fio.out" 2>&1 \
    || { cat "$work/fio.out" >&2; die "fio failed: $*"; }
  python3 - "$work/fio.json" "$rw" <<'PY'
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
d = job["write" if sys.argv[2].endswith("write") else "read"]
if d.get("total_ios", 1) == 0 or job.get("error", 0):
    sys.exit(f"fio did no I/O (error {job.get('error')})")
client_us = (job["usr_cpu"] + job["sys_cpu"]) / 100 * d["runtime"] / 1e3 * 1e6 / max(1, d["total_ios"])
print(f'{d["iops"]:.0f} {d["lat_ns"]["percentile"]["99.000000"] / 1e3:.1f} {d["total_ios"]} {client_us:.1f}')
PY
}

# Lays out `file` of fio size $2 with sequential 1 MiB O_DIRECT writes (no holes, no unwritten
# extents).
layout() { # file size
  fio --name=layout --filename="$1" --size="$2" --bs=1M --rw=write \
    --ioengine=io_uring --direct=1 --iodepth=8 --output-format=terse >/dev/null
}

# Starts `cairn node run` on data directory $1 (which holds a formatted dev0.img) with vdisk vd0
# of VDISK_SIZE, NBD and iSCSI on free loopback ports; sets node_pid, node_port (NBD) and
# node_iscsi_port.
start_node() { # data_dir
  local dir=$1
  node_port=$(free_port)
  node_iscsi_port=$(free_port)
  [[ "$node_iscsi_port" != "$node_port" ]] || node_iscsi_port=$((node_port + 1))
  {
    echo "listen = \"127.0.0.1\""
    echo "nbd_port = $node_port"
    echo "iscsi_port = $node_iscsi_port"
    echo "grpc_port = $(free_port)"
    echo "data_port = $(free_port)"
    [[ -n "$CORES" ]] && echo "cores = $CORES"
    echo "[[device]]"
    echo "path = \"dev0.img\""
    echo "[[vdisk]]"
    echo "name = \"vd0\""
    echo "size = \"$VDISK_SIZE\""
  } >"$dir/node.toml"
  "$bin" node run --data-dir "$dir" --config "$dir/node.toml" >"$dir/node.log" 2>&1 &
  node_pid=$!
  pids+=("$node_pid")
  for _ in $(seq 600); do
    grep -q "cairn node: ready" "$dir/node.log" && return 0
    kill -0 "$node_pid" 2>/dev/null || break
    sleep 0.1
  done
  cat "$dir/node.log" >&2
  die "the node did not become ready"
}

# Drops $1 from `pids` once it has been stopped and reaped, so the exit trap never signals a
# number the kernel may have given to another process since.
forget_pid() {
  local p kept=()
  for p in "${pids[@]}"; do [[ "$p" == "$1" ]] || kept+=("$p"); done
  pids=("${kept[@]}")
}

stop_pid() {
  if kill -TERM "$1" 2>/dev/null; then
    for _ in $(seq 600); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
  fi
  wait "$1" 2>/dev/null || true
  forget_pid "$1"
}

# The markdown rows describing the machine (after a "| machine | |" header); extra rows come
# from the caller.
machine_rows() {
  echo "| nproc | $(nproc) ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')) |"
  echo "| kernel | $(uname -r) |"
  echo "| memory | $(free -h | awk '/^Mem:/ {print $2}') |"
  echo "| fio | $(fio --version) |"
  echo "| rustc | $(rustc --version) |"
  echo "| cairn (built from) | $built_from |"
  [[ -n "$dirty" ]] && echo "| uncommitted files in the build (outside perf/) | $dirty|"
  return 0
}
