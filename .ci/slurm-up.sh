#!/usr/bin/env bash
# Bring up a single-node SLURM cluster on this machine (controller and compute node on localhost) for the
# workflow tests. Idempotent: when munged, slurmctld and slurmd are alive (checked through their pid files, not
# pgrep: there is no systemd here and dead daemons can linger as zombies) and the node is idle, it exits at once.
#
#   .ci/slurm-up.sh            install (Debian apt) if needed, configure, start, wait for the node to be idle
#   .ci/slurm-up.sh --status   print the state and exit 0 when up, 1 otherwise
#
# Needs root and Debian's apt (as in CI). No accounting database: the snakemake SLURM profile therefore sets
# `slurm-status-command: squeue` and `slurm-no-account: true`, and MinJobAge keeps finished jobs visible to squeue.
set -euo pipefail

NODE=localhost
PARTITION=debug
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
STATE=/var/lib/slurm-scmlm
RUN=/run/slurm-scmlm
LOGDIR=/var/log/slurm-scmlm
CTLD_PID=$RUN/slurmctld.pid
SLURMD_PID=$RUN/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
MUNGE_SOCKET=/run/munge/munge.socket.2
TIMEOUT=${SLURM_UP_TIMEOUT:-60}

log() { echo "slurm-up: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# A pid file names a live process if the pid exists and is not a zombie.
alive() {
    local pidfile=$1 pid state
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ -r /proc/$pid/stat ]] || return 1
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ $state != Z && $state != X ]]
}

node_state() { sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -n1 || true; }

is_up() {
    alive "$MUNGE_PID" && alive "$CTLD_PID" && alive "$SLURMD_PID" || return 1
    case "$(node_state)" in idle | mixed | allocated | completing) return 0 ;; *) return 1 ;; esac
}

if [[ ${1:-} == --status ]]; then
    for f in "$MUNGE_PID" "$CTLD_PID" "$SLURMD_PID"; do
        if alive "$f"; then echo "$f: alive ($(<"$f"))"; else echo "$f: not running"; fi
    done
    echo "node $NODE: $(node_state)"
    is_up
    exit
fi

if command -v sinfo >/dev/null && is_up; then
    log "already up (node $NODE $(node_state))"
    exit 0
fi

[[ $(id -u) -eq 0 ]] || die "must run as root (CI runs as root); start it with sudo"

# --- install ---------------------------------------------------------------------------------------------------
need=()
for bin in slurmctld slurmd sinfo munged; do command -v "$bin" >/dev/null || need+=("$bin"); done
if ((${#need[@]})); then
    log "installing slurmctld slurmd slurm-client munge (missing: ${need[*]})"
    export DEBIAN_FRONTEND=noninteractive
    # other jobs may hold the dpkg lock (parallel installs on a shared machine): wait for it
    apt_opts=(-o DPkg::Lock::Timeout=900 -y -q --no-install-recommends)
    apt-get -o DPkg::Lock::Timeout=900 -q update >/dev/null
    apt-get install "${apt_opts[@]}" slurmctld slurmd slurm-client munge >/dev/null
fi

# --- munge -----------------------------------------------------------------------------------------------------
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating munge key"
    if command -v mungekey >/dev/null; then mungekey --create --force; else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
fi
MUNGE_USER=root
id munge >/dev/null 2>&1 && MUNGE_USER=munge
chown -R "$MUNGE_USER": /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
if ! alive "$MUNGE_PID"; then
    log "starting munged"
    rm -f "$MUNGE_PID" "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    if [[ $MUNGE_USER == root ]]; then munged --force; else runuser -u munge -- munged; fi
fi
for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.1; done
munge -n </dev/null | unmunge >/dev/null || die "munge does not work; see /var/log/munge/munged.log"

# --- slurm.conf ------------------------------------------------------------------------------------------------
# The plugin passes --mem, so the node must declare its memory; take CPUs and RealMemory from slurmd -C.
hw=$(slurmd -C 2>/dev/null | head -n1)
CPUS=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
MEM=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
[[ -n $CPUS ]] || CPUS=$(nproc)
[[ -n $MEM ]] || MEM=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
MEM=$((MEM * 95 / 100)) # a margin so a small drift in reported memory does not drain the node

mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" "$RUN" "$LOGDIR"
new_conf=$(mktemp)
cat >"$new_conf" <<EOF
# Written by scmlm .ci/slurm-up.sh: single-node test cluster, no accounting database.
ClusterName=scmlm
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
# finished jobs stay visible to squeue for 30 minutes (the plugin's status checks use squeue)
MinJobAge=1800
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
if ! cmp -s "$new_conf" "$CONF"; then
    log "writing $CONF (CPUs=$CPUS RealMemory=$MEM)"
    # a changed configuration needs restarted daemons
    for f in "$SLURMD_PID" "$CTLD_PID"; do alive "$f" && kill "$(<"$f")" 2>/dev/null || true; done
    for _ in $(seq 50); do alive "$SLURMD_PID" || alive "$CTLD_PID" || break; sleep 0.1; done
    install -m 0644 "$new_conf" "$CONF"
fi
rm -f "$new_conf"
# No cgroup.conf: slurmd then autodetects cgroups (22.05 has no "CgroupPlugin=disabled" and fails to start with it).

# --- daemons ---------------------------------------------------------------------------------------------------
if ! alive "$CTLD_PID"; then
    log "starting slurmctld"
    rm -f "$CTLD_PID"
    slurmctld
fi
if ! alive "$SLURMD_PID"; then
    log "starting slurmd -N $NODE"
    rm -f "$SLURMD_PID"
    slurmd -N "$NODE"
fi

# --- wait for the node -----------------------------------------------------------------------------------------
deadline=$((SECONDS + TIMEOUT))
resumed=0
while ((SECONDS < deadline)); do
    state=$(node_state)
    case "$state" in
    idle | mixed | allocated | completing)
        log "up: node $NODE $state (CPUs=$CPUS RealMemory=$MEM), partition $PARTITION"
        exit 0
        ;;
    down* | drain* | fail*)
        # e.g. left down by an earlier unclean stop
        if ((!resumed)); then
            scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
            resumed=1
        fi
        ;;
    esac
    alive "$CTLD_PID" || die "slurmctld exited; see $LOGDIR/slurmctld.log"
    alive "$SLURMD_PID" || die "slurmd exited; see $LOGDIR/slurmd.log"
    sleep 0.2
done
sinfo -N -l >&2 || true
die "node $NODE not idle after ${TIMEOUT}s (state: $(node_state)); see $LOGDIR/"
