#!/usr/bin/env bash
# A local multi-node cluster on loopback, for trying failures by hand and in tests.
#
#   scripts/cluster.sh up N        start nodes 1..N as founding voters (127.0.0.<i+1>:<7110+i>)
#   scripts/cluster.sh kill I      kill -9 node I
#   scripts/cluster.sh start I     start node I again (same data dir, same peers)
#   scripts/cluster.sh stop I      SIGTERM node I and wait for it
#   scripts/cluster.sh partition I cut node I off from every other node (iptables, root)
#   scripts/cluster.sh heal I      undo `partition I`
#   scripts/cluster.sh status      process table, then `cairn cluster status` from a live node
#   scripts/cluster.sh endpoints   the comma-separated endpoints (for --endpoint)
#   scripts/cluster.sh down        kill every node, heal every partition, delete the state
#
# Each node is a full `cairn node run` (control plane and data plane, one unpinned data-plane
# core, a sparse 4 GiB device file in its data dir) with its config in n<i>/node.toml; node 1
# creates the cluster with a 1 GiB vdisk vd0 (RF2 container). Node i serves NBD on
# 127.0.0.<i+1>:10809 and iSCSI on 127.0.0.<i+1>:3260. CAIRN_CLUSTER_MODE=controlplane runs
# `cairn controlplane run` processes instead (no data plane).
#
# Node i listens on its own loopback address 127.0.0.<i+1> and its outgoing raft connections
# leave from it, so a partition is two iptables rules per peer on address pairs: node I and the
# other nodes stop hearing each other, while operators' commands from 127.0.0.1 still reach
# node I (to observe that a minority commits nothing).
#
# Environment: CAIRN_BIN (default: target/debug/cairn under $CARGO_TARGET_DIR or ./target),
# CAIRN_CLUSTER_DIR (default /tmp/cairn-cluster), CAIRN_CLUSTER_BASE_PORT (default 7110),
# CAIRN_CLUSTER_SHARDS (metadata shards, default 4), CAIRN_CLUSTER_MODE (node|controlplane).
set -euo pipefail

DIR=${CAIRN_CLUSTER_DIR:-/tmp/cairn-cluster}
BASE_PORT=${CAIRN_CLUSTER_BASE_PORT:-7110}
SHARDS=${CAIRN_CLUSTER_SHARDS:-4}
MODE=${CAIRN_CLUSTER_MODE:-node}
BIN=${CAIRN_BIN:-${CARGO_TARGET_DIR:-$(dirname "$0")/../target}/debug/cairn}
TAG=cairn-cluster

die() { echo "cluster.sh: $*" >&2; exit 1; }
ip_of() { echo "127.0.0.$(($1 + 1))"; }
port_of() { echo $((BASE_PORT + $1)); }
addr_of() { echo "$(ip_of "$1"):$(port_of "$1")"; }
count() { [ -f "$DIR/count" ] && cat "$DIR/count" || die "no cluster in $DIR (run: up N)"; }
pid_of() { [ -f "$DIR/n$1/pid" ] && cat "$DIR/n$1/pid" || true; }
alive() { local p; p=$(pid_of "$1"); [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }
check_node() { [[ "$1" =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le "$(count)" ] || die "no node $1"; }

peers() {
    local n i out=""
    n=$(count)
    for i in $(seq 1 "$n"); do out+="${out:+,}$i=$(addr_of "$i")"; done
    echo "$out"
}

endpoints() {
    local n i out=""
    n=$(count)
    for i in $(seq 1 "$n"); do out+="${out:+,}$(addr_of "$i")"; done
    echo "$out"
}

start_node() {
    local i=$1
    alive "$i" && die "node $i is running (pid $(pid_of "$i"))"
    mkdir -p "$DIR/n$i"
    if [ "$MODE" = controlplane ]; then
        "$BIN" controlplane run --data-dir "$DIR/n$i/data" --listen "$(addr_of "$i")" \
            --node-id "$i" --peers "$(peers)" --shards "$SHARDS" >>"$DIR/n$i/log" 2>&1 &
    else
        [ -f "$DIR/n$i/node.toml" ] || node_config "$i" >"$DIR/n$i/node.toml"
        "$BIN" node run --data-dir "$DIR/n$i/data" --config "$DIR/n$i/node.toml" \
            >>"$DIR/n$i/log" 2>&1 &
    fi
    echo $! >"$DIR/n$i/pid"
    echo "node $i: pid $!, $(addr_of "$i"), log $DIR/n$i/log"
}

node_config() {
    local i=$1 p list=""
    for p in $(peers | tr ',' ' '); do list+="${list:+, }\"$p\""; done
    cat <<EOF
node_id = $i
listen = "$(ip_of "$i")"
grpc_port = $(port_of "$i")
peers = [$list]
metadata_shards = $SHARDS
cores = 1
pin_cores = false
cache_size = "64MiB"

[[device]]
path = "dev0.img"
size = "4GiB"
tier = "ssd"

[[vdisk]]
name = "vd0"
size = "1GiB"
EOF
}

iptables_rules() { # $1 = -A or -D, $2 = node
    local op=$1 i=$2 j n
    n=$(count)
    for j in $(seq 1 "$n"); do
        [ "$j" = "$i" ] && continue
        iptables "$op" INPUT -s "$(ip_of "$i")" -d "$(ip_of "$j")" -m comment --comment "$TAG-n$i" -j DROP
        iptables "$op" INPUT -s "$(ip_of "$j")" -d "$(ip_of "$i")" -m comment --comment "$TAG-n$i" -j DROP
    done
}

heal_node() {
    [ -f "$DIR/n$1/partitioned" ] || return 0
    iptables_rules -D "$1" 2>/dev/null || true
    rm -f "$DIR/n$1/partitioned"
}

cmd=${1:-}
case "$cmd" in
up)
    n=${2:-3}
    [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 9 ] || die "up N: N in 1..9"
    [ -x "$BIN" ] || die "no cairn binary at $BIN (cargo build, or set CAIRN_BIN)"
    [ -f "$DIR/count" ] && die "a cluster exists in $DIR (down first)"
    mkdir -p "$DIR"
    echo "$n" >"$DIR/count"
    for i in $(seq 1 "$n"); do start_node "$i"; done
    echo "endpoints: $(endpoints)"
    ;;
kill)
    check_node "${2:-}"
    alive "$2" || die "node $2 is not running"
    kill -9 "$(pid_of "$2")"
    wait "$(pid_of "$2")" 2>/dev/null || true
    echo "node $2 killed (-9)"
    ;;
stop)
    check_node "${2:-}"
    alive "$2" || die "node $2 is not running"
    p=$(pid_of "$2")
    kill -TERM "$p"
    while kill -0 "$p" 2>/dev/null; do sleep 0.1; done
    echo "node $2 stopped"
    ;;
start)
    check_node "${2:-}"
    start_node "$2"
    ;;
partition)
    check_node "${2:-}"
    iptables -V >/dev/null 2>&1 || die "iptables is not available (apt-get install iptables)"
    [ -f "$DIR/n$2/partitioned" ] && die "node $2 is partitioned already"
    iptables_rules -A "$2"
    touch "$DIR/n$2/partitioned"
    echo "node $2 partitioned from the other nodes"
    ;;
heal)
    check_node "${2:-}"
    heal_node "$2"
    echo "node $2 healed"
    ;;
status)
    n=$(count)
    live=""
    for i in $(seq 1 "$n"); do
        state=down
        if alive "$i"; then state="up (pid $(pid_of "$i"))"; live=${live:-$(addr_of "$i")}; fi
        [ -f "$DIR/n$i/partitioned" ] && state="$state, partitioned"
        echo "node $i  $(addr_of "$i")  $state"
    done
    [ -n "$live" ] && "$BIN" cluster status --endpoint "$live" --retry-secs 2 || true
    ;;
endpoints)
    endpoints
    ;;
down)
    if [ -f "$DIR/count" ]; then
        n=$(count)
        for i in $(seq 1 "$n"); do
            heal_node "$i"
            if alive "$i"; then kill -9 "$(pid_of "$i")"; fi
        done
    fi
    rm -rf "$DIR"
    echo "cluster in $DIR removed"
    ;;
*)
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    [ -z "$cmd" ] || exit 2
    ;;
esac
