#!/usr/bin/env bash
# micro-ceph.sh - the tests' throwaway one-node Ceph cluster: one monitor, one memstore OSD,
# pool size 1, cephx, loopback only, no systemd, nothing outside DIR. Debian 12's Ceph 16.2:
#   apt-get install -y --no-install-recommends ceph-mon ceph-osd ceph-common
#
#   micro-ceph.sh start DIR   start a cluster in DIR (wiped first); pool $POOL (`rbd pool init`)
#                             and one cephx user per client in $CLIENTS, each allowed `profile
#                             rbd` on that pool only (one user per "host": blocklisting one
#                             fences only that one). Prints shell lines to eval (CEPH_CONF, ...).
#                             Client keyrings: DIR/client.NAME.keyring (also found via the conf).
#   micro-ceph.sh stop DIR    KILL the daemons whose pid files are in DIR (only processes whose
#                             command line names DIR's conf), then rm -rf DIR (KEEP=1 keeps it).
#
# Knobs: POOL=rbd  CLIENTS="cryptvol-a cryptvol-b"  MEMSTORE_BYTES=1073741824  TIMEOUT=60
#
# Memstore keeps every object in the OSD's RAM (2-2.5x what is written, not returned by `rbd
# rm`): keep test images small. The monitor's paxos batching window is shortened from 1 s to
# 0.05 s, which takes a cold start from ~7.5 s to under 1 s. Never take a legacy advisory lock
# (`rbd lock add`) on an image with exclusive-lock: later writers and `rbd rm` spin forever.
set -euo pipefail

cmd=${1:-}
DIR=${2:-}
POOL=${POOL:-rbd}
CLIENTS=${CLIENTS:-cryptvol-a cryptvol-b}
MEMSTORE_BYTES=${MEMSTORE_BYTES:-1073741824}
TIMEOUT=${TIMEOUT:-60}
PY=/usr/bin/python3 # Debian's, where python3-rados lives

die() { echo "micro-ceph: $*" >&2; exit 1; }
[ -n "$DIR" ] || die "usage: $0 start|stop DIR"

daemon_pids() { # pids of live daemons of the cluster in $DIR
  local f pid
  for f in "$DIR"/run/*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f" 2>/dev/null || true)
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || continue
    # Only a process whose command line names this cluster's conf is ours (pids get reused).
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$DIR/ceph.conf" || continue
    echo "$pid"
  done
}

gone() { # exited, or a zombie with no live threads (daemons are reparented to init)
  [ -d "/proc/$1" ] || return 0
  [ "$(awk '/^State:/{print $2}' "/proc/$1/status" 2>/dev/null)" = Z ] &&
    [ "$(awk '/^Threads:/{print $2}' "/proc/$1/status" 2>/dev/null)" -le 1 ]
}

stop_cluster() {
  [ -d "$DIR/run" ] || return 0
  local pids pid i
  mapfile -t pids < <(daemon_pids)
  [ ${#pids[@]} -gt 0 ] || return 0
  # A throwaway cluster: no clean shutdown needed, and KILL is immediate.
  kill -KILL "${pids[@]}" 2>/dev/null || true
  for i in $(seq 1 100); do
    for pid in "${pids[@]}"; do gone "$pid" || { sleep 0.05; continue 2; }; done
    break
  done
  rm -f "$DIR"/run/*.pid
}

free_port() {
  "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_conf() {
  cat >"$DIR/ceph.conf" <<CONF
[global]
fsid = $FSID
mon host = [v2:127.0.0.1:$1]
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
keyring = $DIR/\$name.keyring
log file = $DIR/log/\$name.log
crash dir = $DIR/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
mon warn on insecure global id reclaim allowed = false
paxos propose interval = 0.05
paxos min wait = 0.01

[mon]
mon data = $DIR/mon
keyring = $DIR/mon/keyring
mon cluster log file = $DIR/log/cluster.log
run dir = $DIR/run
pid file = $DIR/run/\$name.pid
admin socket = $DIR/run/\$name.asok

[osd]
osd data = $DIR/osd
osd objectstore = memstore
memstore device bytes = $MEMSTORE_BYTES
osd class load list = *
osd class default list = *
osd memory target = 1073741824
osd max object name len = 256
osd max object namespace len = 64
run dir = $DIR/run
pid file = $DIR/run/\$name.pid
admin socket = $DIR/run/\$name.asok

[client]
# Clients (tests, rbd, fio) run in many processes, several per name: no admin sockets.
admin socket =
CONF
}

keys() { # every entity's key and caps, made before the mon exists and imported by its mkfs
  local all="$DIR/all.keyring" c
  {
    ceph-authtool --create-keyring "$DIR/mon..keyring" --gen-key -n mon. --cap mon 'allow *'
    ceph-authtool --create-keyring "$DIR/client.admin.keyring" --gen-key -n client.admin \
      --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *'
    ceph-authtool --create-keyring "$DIR/osd.0.keyring" --gen-key -n osd.0 \
      --cap mon 'allow profile osd' --cap osd 'allow *'
    cp "$DIR/mon..keyring" "$all"
    ceph-authtool "$all" --import-keyring "$DIR/client.admin.keyring"
    ceph-authtool "$all" --import-keyring "$DIR/osd.0.keyring"
    for c in $CLIENTS; do
      ceph-authtool --create-keyring "$DIR/client.$c.keyring" --gen-key -n "client.$c" \
        --cap mon 'profile rbd' --cap osd "profile rbd pool=$POOL"
      ceph-authtool "$all" --import-keyring "$DIR/client.$c.keyring"
    done
  } >/dev/null
}

start_cluster() {
  for t in ceph-mon ceph-osd ceph-authtool monmaptool rbd; do
    command -v "$t" >/dev/null || die "$t not installed (ceph-mon ceph-osd ceph-common)"
  done
  mkdir -p "$DIR"
  DIR=$(cd "$DIR" && pwd)
  stop_cluster
  trap 'rc=$?; if [ $rc -ne 0 ]; then stop_cluster; echo "micro-ceph: start failed, logs in $DIR/log" >&2; fi' EXIT
  find "$DIR" -mindepth 1 -delete
  mkdir -p "$DIR"/{run,log,crash,mon,osd}
  FSID=$(cat /proc/sys/kernel/random/uuid)
  local port osd_uuid c=(-c "$DIR/ceph.conf")
  port=$(free_port)
  osd_uuid=$(cat /proc/sys/kernel/random/uuid)
  write_conf "$port"
  export CEPH_CONF="$DIR/ceph.conf"
  unset CEPH_ARGS
  keys

  # The OSD's mkfs needs no monitor: it runs while the monitor comes up.
  ceph-osd "${c[@]}" -i 0 --mkfs --osd-uuid "$osd_uuid" --no-mon-config >"$DIR/log/osd-mkfs.out" 2>&1 &
  local mkfs_pid=$!
  monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$port]" "$DIR/monmap" >/dev/null
  ceph-mon "${c[@]}" -i a --mkfs --monmap "$DIR/monmap" --keyring "$DIR/all.keyring"
  ceph-mon "${c[@]}" -i a

  # One Python process for the monitor commands (each `ceph` CLI run costs ~0.3 s).
  "$PY" - "$osd_uuid" "$POOL" <<'PY'
import json, sys, rados
osd_uuid, pool = sys.argv[1], sys.argv[2]
c = rados.Rados(conffile='', name='client.admin')
c.conf_read_file()
c.connect(timeout=30)
def mon(**cmd):
    ret, out, err = c.mon_command(json.dumps(cmd), b'')
    if ret != 0:
        sys.exit(f"mon command {cmd} failed: {ret} {err}")
mon(prefix='osd new', uuid=osd_uuid, id=0)
mon(prefix='osd pool create', pool=pool, pg_num=8, pgp_num=8)
c.shutdown()
PY

  wait "$mkfs_pid" || { cat "$DIR/log/osd-mkfs.out" >&2; die "osd mkfs failed"; }
  ceph-osd "${c[@]}" -i 0 2>>"$DIR/log/osd-start.out"
  # `rbd pool init` writes the pool's rbd_info object: it returns once the PGs are active.
  timeout "$TIMEOUT" rbd --id admin pool init "$POOL" || die "pool $POOL not usable after ${TIMEOUT}s (logs in $DIR/log)"
  echo "export CEPH_CONF='$DIR/ceph.conf'"
  echo "export MICRO_CEPH_POOL='$POOL'"
  echo "export MICRO_CEPH_CLIENTS='$CLIENTS'"
}

case "$cmd" in
  start) start_cluster ;;
  stop)
    [ -f "$DIR/ceph.conf" ] || die "$DIR holds no micro-ceph cluster"
    stop_cluster
    if [ "${KEEP:-0}" != 1 ]; then rm -rf "$DIR"; fi
    ;;
  *) die "usage: $0 start|stop DIR" ;;
esac
