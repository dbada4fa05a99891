#!/usr/bin/env bash
# Installs the Debian 12 packages the test suite starts itself: the Slurm + sshd testbed
# (tests/testbed/cluster.py) and Prometheus (tests/test_operations.py).
# Idempotent: does nothing when everything is already installed. Needs root.
set -euo pipefail

# prometheus: the operations tests scrape a run with a real one (docker/prometheus/prometheus.yml).
# poppler-utils: the QA test opens report.pdf in a real PDF reader (pdftotext, pdftoppm).
PKGS=(slurmctld slurmd slurmdbd slurm-client munge openssh-server openssh-client iproute2 procps prometheus
      poppler-utils)

missing=()
for p in "${PKGS[@]}"; do
  # "install ok installed" is the only state that means the package is usable
  if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "[testbed] all packages already installed"
  exit 0
fi

echo "[testbed] installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# --no-install-recommends: no mail server. slurmdbd stores accounting in the machine's MariaDB.
# Package postinst scripts may try to start services; without systemd that is a no-op.
apt-get install -y -qq --no-install-recommends "${missing[@]}"
