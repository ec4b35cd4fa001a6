#!/usr/bin/env bash
# Start a single-node SLURM (slurmctld + slurmd + munged) on loopback, for tests/test_slurm.py.
#
# Idempotent: exits at once when `sinfo` already shows the node up. Needs root (or passwordless
# sudo) and, on the first run, Debian's apt (packages slurm-wlm, munge; ~1 min to install).
#
# Exit status: 0 SLURM is up; 3 cannot be done here (not root, no apt, not Debian-like), the
# reason on stderr; anything else: a start failed (logs under /var/log/slurm/ are printed).
#
# Environment: DASKPATH_SLURM_CPUS (default: nproc), DASKPATH_SLURM_WAIT (seconds, default 60).
set -euo pipefail

log() { echo "slurm-setup: $*" >&2; }
cannot() { log "cannot start SLURM here: $*"; exit 3; }

node_state() { sinfo -h -N -n localhost -o '%T' 2>/dev/null | head -n1 || true; }

if command -v sinfo >/dev/null 2>&1; then
    case "$(node_state)" in
        idle*|mixed*|allocated*|completing*) log "already running"; exit 0 ;;
    esac
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        cannot "not root and no passwordless sudo"
    fi
fi

if ! command -v slurmctld >/dev/null 2>&1 || ! command -v slurmd >/dev/null 2>&1 \
        || ! command -v munged >/dev/null 2>&1 || ! command -v sbatch >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || cannot "slurm is not installed and apt-get is missing"
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq >/dev/null || cannot "apt-get update failed (offline?)"
    $SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
        || cannot "apt-get install slurm-wlm munge failed"
fi

# At least 2 CPUs: the test runs two one-core worker jobs at once. CR_CPU + config_overrides make
# SLURM count logical CPUs as configured, whatever topology slurmd detects (a 1-core/2-thread VM
# under CR_Core, or a cgroup-limited nproc of 1, would otherwise run only one job at a time).
CPUS="${DASKPATH_SLURM_CPUS:-$(nproc)}"
[ "$CPUS" -ge 2 ] 2>/dev/null || CPUS=2
# a node that reports less memory than configured is drained: stay below what `free` shows
MEM_MB=$(free -m | awk '/^Mem:/ {print int($2 * 0.9)}')
CONF_DIR=/etc/slurm
[ -d /etc/slurm-llnl ] && [ ! -d /etc/slurm ] && CONF_DIR=/etc/slurm-llnl

$SUDO mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
$SUDO tee "$CONF_DIR/slurm.conf" >/dev/null <<EOF
# written by daskpath .ci/slurm-setup.sh: one node on loopback, no cgroups, no accounting
ClusterName=daskpath-ci
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:2
EOF

# munge: a key, owned by the munge user, and the daemon
if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null 2>&1; then
        $SUDO mungekey --create --force >/dev/null 2>&1 || true
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        $SUDO sh -c 'dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null'
    fi
fi
$SUDO chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
$SUDO chmod 0400 /etc/munge/munge.key
$SUDO chmod 0755 /run/munge
if ! pgrep -x munged >/dev/null 2>&1; then
    log "starting munged"
    $SUDO runuser -u munge -- /usr/sbin/munged 2>/dev/null || $SUDO /usr/sbin/munged --force
fi
munge -n | unmunge >/dev/null 2>&1 || cannot "munged does not answer (munge -n | unmunge failed)"

if ! pgrep -x slurmctld >/dev/null 2>&1; then
    log "starting slurmctld"
    $SUDO slurmctld -c || { $SUDO tail -n 30 /var/log/slurm/slurmctld.log >&2 || true; exit 1; }
fi
if ! pgrep -x slurmd >/dev/null 2>&1; then
    log "starting slurmd"
    $SUDO slurmd -N localhost || { $SUDO tail -n 30 /var/log/slurm/slurmd.log >&2 || true; exit 1; }
fi

WAIT="${DASKPATH_SLURM_WAIT:-60}"
for _ in $(seq 1 "$WAIT"); do
    state="$(node_state)"
    case "$state" in
        idle*|mixed*|allocated*) log "node localhost is $state (${CPUS} CPUs, ${MEM_MB} MB)"; exit 0 ;;
        drain*|down*) $SUDO scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 1
done
log "node did not become idle within ${WAIT}s (state: $(node_state)); logs:"
$SUDO tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
