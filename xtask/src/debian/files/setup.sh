#!/bin/sh
# vmscale Debian guest: run once inside the new root filesystem (chroot) by
# mmdebstrap's customize hook, after the configuration files are copied in.
# $1: the informant's Debian package (under /tmp). Nothing runs here: no
# systemd, no network; units are only enabled, masked or disabled.
set -eu
deb=$1

# The informant, from its package: its postinst enables the unit (systemd is
# not running here, so nothing starts).
dpkg -i "$deb"
rm -f "$deb"
systemctl is-enabled --quiet vmscale-informant.service

systemctl enable vmscale-cmdline.service vmscale-ready.service

# Boot speed under TCG: nothing that a test VM does not need. Timers for a
# long-lived machine (apt, dpkg backups, filesystem scrubs and trims), the
# pstore collector, and the consoles' login prompts: getty on tty1 (there
# is no display) and on ttyS0, where systemd-getty-generator would start one
# because the console is there; its prompt and screen resets would land in
# the log tests read, and nobody logs in (QMP, psql and the informant are
# the ways in).
systemctl mask \
	apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer \
	e2scrub_all.timer e2scrub_reap.service fstrim.timer man-db.timer \
	systemd-timesyncd.service systemd-pstore.service \
	getty@tty1.service serial-getty@ttyS0.service \
	remote-fs.target

# PostgreSQL 15: the package made the cluster 15/main; make it if not.
[ -d /var/lib/postgresql/15/main ] || pg_createcluster 15 main
cat /etc/vmscale-build/pg_hba.conf >>/etc/postgresql/15/main/pg_hba.conf
# The copy-in may have left conf.d (and its parents) root's: Debian's
# PostgreSQL tools expect the cluster's configuration to be its owner's.
chown -R postgres:postgres /etc/postgresql/15/main
# The demo password and the pgbench database, in single-user mode: no
# server, socket or network needed inside the chroot (and dynamic shared
# memory in files, not /dev/shm, which a chroot may lack).
runuser -u postgres -- /usr/lib/postgresql/15/bin/postgres --single \
	-D /var/lib/postgresql/15/main \
	-c config_file=/etc/postgresql/15/main/postgresql.conf \
	-c dynamic_shared_memory_type=mmap postgres >/tmp/vmscale-pg.log 2>&1 <<'SQL'
ALTER USER postgres PASSWORD 'vmscale';
CREATE DATABASE pgbench;
SQL
if grep -q ERROR /tmp/vmscale-pg.log; then
	cat /tmp/vmscale-pg.log
	exit 1
fi
rm -f /tmp/vmscale-pg.log
rm -rf /etc/vmscale-build

echo vmscale-guest >/etc/hostname
printf '127.0.0.1\tlocalhost\n127.0.1.1\tvmscale-guest\n::1\tlocalhost ip6-localhost ip6-loopback\n' >/etc/hosts
# No root password and no login: the image is for tests and the demo.
echo "vmscale setup done"
