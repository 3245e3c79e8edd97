#!/usr/bin/env bash
# Stop the single-node test SLURM started by .ci/slurm-up.sh (slurmd, slurmctld, munged), by their pid files.
# Configuration, state and the installed packages stay; .ci/slurm-up.sh starts it again.
set -euo pipefail
for pidfile in /run/slurm-scmlm/slurmd.pid /run/slurm-scmlm/slurmctld.pid /run/munge/munged.pid; do
    [[ -s $pidfile ]] || continue
    pid=$(<"$pidfile")
    if [[ -r /proc/$pid/stat ]] && [[ $(awk '{print $3}' "/proc/$pid/stat") != Z ]]; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do [[ -r /proc/$pid/stat ]] && [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] || break; sleep 0.1; done
        echo "slurm-down: stopped $(basename "$pidfile" .pid) ($pid)" >&2
    fi
    rm -f "$pidfile"
done
