#!/usr/bin/env bash
# A throwaway one-node SLURM cluster on this machine, for trying the templates and for the
# test suite (tests/test_slurm.py). Debian/Ubuntu, as root; no systemd, no cgroups.
#
#   bash slurm/local-cluster.sh install          apt-get the packages (slurmctld slurmd
#                                                slurm-client munge) if any is missing
#   bash slurm/local-cluster.sh start STATE_DIR  write STATE_DIR/slurm.conf, start a private
#                                                munged, slurmctld and slurmd; wait until
#                                                the node is idle
#   bash slurm/local-cluster.sh stop STATE_DIR   cancel its jobs, stop what `start` started
#
# After `start`, point the client commands at the cluster with
#   export SLURM_CONF=STATE_DIR/slurm.conf
# The cluster listens on 127.0.0.1 only, on two free ports picked at start, and its munged
# on its own socket, so it collides neither with a system SLURM nor another local cluster. Settings:
#   LORIF_SLURM_CPUS   CPUs the node advertises (default: max(nproc, 4); more than the
#                      machine has is allowed, jobs then share cores)
#   LORIF_SLURM_WAIT   seconds to wait for the daemons (default 60)
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)

die() { echo "local-cluster: $*" >&2; exit 1; }

cmd_install() {
  local missing=()
  for tool in slurmctld slurmd sbatch munged; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || missing+=("$tool")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    echo "local-cluster: SLURM and munge already installed"
    return 0
  fi
  [ "$(id -u)" = 0 ] || die "installing ${PACKAGES[*]} needs root (missing: ${missing[*]})"
  command -v apt-get >/dev/null 2>&1 || die "no apt-get here; install ${PACKAGES[*]} by hand"
  echo "local-cluster: installing ${PACKAGES[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${PACKAGES[@]}" >/dev/null
}

free_port() {
  # An unused TCP port on the loopback (the kernel's choice).
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for() {
  # wait_for SECONDS DESCRIPTION COMMAND...: polls COMMAND every 0.2 s.
  local limit=$1 what=$2
  shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.2
  done
}

start_munge() {
  # A private munged on its own socket: it neither needs nor disturbs a system munged, and
  # `stop` ends exactly this one. Its directory lives in /tmp because munged runs as the
  # munge user, which must reach the socket's directory (the state dir may be private).
  local state=$1 dir
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile /etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  dir=$(mktemp -d /tmp/lorif-munge.XXXXXX)
  chown munge:munge "$dir"
  chmod 711 "$dir" # munged requires execute permission for all on the socket's directory
  echo "$dir" >"$state/munge.dir"
  runuser -u munge -- /usr/sbin/munged --socket="$dir/munge.sock" --pid-file="$dir/munged.pid" \
    --log-file="$dir/munged.log" --seed-file="$dir/munged.seed" ||
    die "munged did not start; see $dir/munged.log"
  wait_for 20 munged sh -c "munge -n -S '$dir/munge.sock' | unmunge -S '$dir/munge.sock'" ||
    die "munged did not answer within 20 s; see $dir/munged.log"
}

write_conf() {
  local state=$1 host cpus
  host=$(hostname -s)
  cpus=${LORIF_SLURM_CPUS:-$(($(nproc) > 4 ? $(nproc) : 4))}
  mkdir -p "$state/ctld" "$state/spool" "$state/log"
  # cgroup-free settings: linuxproc process tracking, no task binding, no accounting.
  cat >"$state/slurm.conf" <<EOF
ClusterName=lorif-local
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$(cat "$state/munge.dir")/munge.sock
CredType=cred/munge
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=batch_sched_delay=0
DependencyParameters=kill_invalid_depend
SlurmdParameters=config_overrides
MailProg=/bin/true
ReturnToService=2
MpiDefault=none
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
EOF
}

cmd_start() {
  local state=${1:?usage: local-cluster.sh start STATE_DIR}
  [ "$(id -u)" = 0 ] || die "starting slurmctld/slurmd here needs root"
  for tool in slurmctld slurmd sbatch munged; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] ||
      die "$tool is not installed; run: bash slurm/local-cluster.sh install"
  done
  mkdir -p "$state"
  state=$(cd "$state" && pwd)
  local limit=${LORIF_SLURM_WAIT:-60} host
  host=$(hostname -s)
  start_munge "$state"
  write_conf "$state"
  export SLURM_CONF=$state/slurm.conf

  # -D keeps the daemons in the foreground of their own session; -c starts from a clean
  # job state. Their pids go to STATE_DIR so `stop` ends exactly these processes.
  setsid /usr/sbin/slurmctld -D -c -f "$SLURM_CONF" >"$state/log/slurmctld.out" 2>&1 &
  echo $! >"$state/slurmctld.daemon.pid"
  wait_for "$limit" slurmctld sh -c 'scontrol ping | grep -q UP' ||
    die "slurmctld did not come up within ${limit} s; see $state/log/slurmctld.log"
  setsid /usr/sbin/slurmd -D -N "$host" -f "$SLURM_CONF" >"$state/log/slurmd.out" 2>&1 &
  echo $! >"$state/slurmd.daemon.pid"
  local deadline=$((SECONDS + limit)) node_state=""
  while :; do
    node_state=$(sinfo -h -N -o %t 2>/dev/null | head -1)
    case "$node_state" in
      idle) break ;;
      down* | drain* | drng*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
    esac
    [ $SECONDS -lt $deadline ] ||
      die "node $host is '$node_state' after ${limit} s; see $state/log/slurmd.log"
    sleep 0.2
  done
  echo "local-cluster: up ($host, $(sinfo -h -o %c) CPUs); export SLURM_CONF=$SLURM_CONF"
}

stop_pids() {
  # Ends the processes whose pids are in the given files: TERM to all, then KILL whatever
  # is left after 5 s.
  local pids=() file pid
  for file in "$@"; do
    [ -s "$file" ] && pids+=("$(cat "$file")")
    rm -f "$file"
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  kill "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 50); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 1 ] || return 0
    sleep 0.1
  done
  kill -9 "${pids[@]}" 2>/dev/null || true
}

cmd_stop() {
  local state=${1:?usage: local-cluster.sh stop STATE_DIR} dir=""
  [ -f "$state/slurm.conf" ] || return 0
  export SLURM_CONF=$state/slurm.conf
  scancel --user=root >/dev/null 2>&1 || true
  [ -s "$state/munge.dir" ] && dir=$(cat "$state/munge.dir")
  stop_pids "$state/slurmd.daemon.pid" "$state/slurmctld.daemon.pid"
  if [ -n "$dir" ]; then
    stop_pids "$dir/munged.pid"
    rm -rf "$dir" "$state/munge.dir"
  fi
  echo "local-cluster: stopped"
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start "${2:-}" ;;
  stop) cmd_stop "${2:-}" ;;
  *) die "usage: local-cluster.sh install | start STATE_DIR | stop STATE_DIR" ;;
esac
