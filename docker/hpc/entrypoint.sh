#!/bin/sh
# Starts the one-node cluster of the compose stack. On first start it makes the pipeline's
# SSH key pair and a known_hosts line for this host's key in /keys (a volume the mqi
# containers mount read-only): the host key is pinned there, never accepted blindly.
set -eu
mkdir -p /keys /scratch/mqi /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /run/sshd
[ -f /etc/ssh/ssh_host_ed25519_key ] || ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key
if [ ! -f /keys/id_ed25519 ]; then
  ssh-keygen -q -t ed25519 -N '' -C mqi-pipeline -f /keys/id_ed25519
  chown 1000:1000 /keys/id_ed25519  # uid 1000: the mqi user of the pipeline's image
fi
echo "hpc $(cut -d' ' -f1-2 /etc/ssh/ssh_host_ed25519_key.pub)" > /keys/known_hosts
install -d -o mqi -g mqi -m 0700 /home/mqi/.ssh
install -o mqi -g mqi -m 0600 /keys/id_ed25519.pub /home/mqi/.ssh/authorized_keys
chown mqi:mqi /scratch/mqi
for i in 0 1; do [ -e /dev/fakegpu$i ] || mknod -m 0666 /dev/fakegpu$i c 1 3; done
[ -f /etc/munge/munge.key ] || mungekey --create
chown munge:munge /etc/munge/munge.key /run/munge
su -s /bin/sh munge -c munged
slurmctld
slurmd
# The engine is on the batch jobs' PATH.
ln -sf /opt/mqi/bin/mqi-demo-engine /usr/local/bin/mqi-demo-engine
exec /usr/sbin/sshd -D -e
