#!/usr/bin/env bash
# Run COMMAND (the test suite) with what it needs from the system besides Python:
#   - a private single-node Slurm cluster (tests/test_slurm.py, tests/test_study_slurm.py: sbatch, squeue,
#     sacct, requeue) from scripts/slurm-test-cluster.sh, started before COMMAND and stopped after it;
#   - Chromium, for scripts/check_report.sh (tests/test_check_report.py opens a real report).
#
#   scripts/test-services.sh COMMAND [ARGS...]      (`make test` runs the suite through it)
#
# As root with apt-get (CI, a fresh container), the Debian packages that are missing are installed first:
#   slurmctld slurmd slurm-client munge slurmdbd mariadb-server chromium
# Otherwise, or with KDPROBE_TEST_SERVICES=0, COMMAND runs as it is and those tests skip, each saying why.
# KDPROBE_SLURM_DIR (default /tmp/kdprobe-slurm-test) is where the cluster lives while COMMAND runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server chromium)

if [ "${KDPROBE_TEST_SERVICES:-1}" != 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "test-services: installing ${missing[*]}" >&2
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    export KDPROBE_SLURM_DIR=${KDPROBE_SLURM_DIR:-/tmp/kdprobe-slurm-test}
    bash scripts/slurm-test-cluster.sh start
    trap 'bash scripts/slurm-test-cluster.sh stop' EXIT
    export SLURM_CONF=$KDPROBE_SLURM_DIR/etc/slurm.conf
else
    echo "test-services: not root with apt-get (or KDPROBE_TEST_SERVICES=0): no Slurm cluster started, no" \
         "packages installed; the Slurm and Chromium tests skip unless those are already there" >&2
fi
"$@"
