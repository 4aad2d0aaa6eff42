#!/bin/sh
# /init of the vmscale test guest, run by busybox sh as PID 1.
#
# It mounts the kernel's filesystems, loads the modules the guest needs,
# brings up the network, starts the informant and runs the workload in its
# own cgroup. Its own lines on the serial console start with
# "vmscale: [UPTIME]" (seconds since the kernel started), so a host can time
# the boot and the workload from the log.
#
# Kernel command line keys (a value holds no spaces: write commas, they
# become spaces):
#   vmscale.workload=CMD,ARG,...  what runs in /sys/fs/cgroup/workload. Inside
#                                 the host's root (chroot /host) when the 9p
#                                 share `hostroot` is there, so host programs
#                                 such as stress-ng run; else in this
#                                 initramfs (busybox). Default: idle.
#   vmscale.poweroff=1            power off when the workload ends.
#   vmscale.ip=ADDR/LEN           eth0's address (default 10.0.2.15/24, QEMU
#                                 user networking).
#   vmscale.gw=ADDR               default route (default 10.0.2.2).
#   vmscale.port=PORT             the informant's TCP port (default 7080).
#   vmscale.listen=ADDR           the informant's listen address instead:
#                                 tcp:HOST:PORT, vsock:PORT or vsock:CID:PORT
#                                 (a vsock device from QEMU, e.g. vhost-user).
#   vmscale.informant=ARG,...     more informant flags, e.g.
#                                 --cpu-mode,sysfs or --log,debug.
# The kernel itself applies sysctl.KEY=VALUE, e.g. sysctl.vm.overcommit_memory=1.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
umask 022

# /proc first: the log lines read the uptime from it.
mount -t proc proc /proc
log() {
	read -r up _ </proc/uptime
	echo "vmscale: [$up] $*"
}
log "init started: $(cat /etc/vmscale/image)"

mount -t sysfs sysfs /sys
# Only emergencies go to the console: each printk to the serial port costs
# the guest milliseconds under TCG, and an OOM kill prints dozens of lines,
# which delayed the informant's eBPF events behind the console. The kernel's
# log (dmesg) keeps everything; OOM kills are reported below from it.
echo 1 >/proc/sys/kernel/printk
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
hostname vmscale-guest

# The informant's eBPF programs attach to tracepoints, found through tracefs
# (it would mount it itself, but a log line here is clearer); debugfs and
# bpffs for people poking around with bpftool.
mount -t tracefs tracefs /sys/kernel/tracing || log "no tracefs: the informant runs without eBPF"
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null

# cgroup v2 with every controller handed down to the children, so the
# workload's cgroup has memory.events, memory.pressure, cpu.stat, ...
mount -t cgroup2 cgroup2 /sys/fs/cgroup
for c in $(cat /sys/fs/cgroup/cgroup.controllers); do
	echo "+$c" >/sys/fs/cgroup/cgroup.subtree_control || log "cannot enable the $c controller"
done
mkdir -p /sys/fs/cgroup/workload

# Modules, in dependency order (written by `cargo xtask build-guest`).
while read -r m; do
	insmod "/lib/modules/$m.ko" || log "insmod $m failed"
done </etc/vmscale/modules
log "modules loaded"

# CPUs and memory present at boot but offline (QEMU devices given on the
# command line, e.g. a migration target's): online. Later hotplugs are the
# kernel's (memhp_default_state=online_movable) and the informant's.
for f in /sys/devices/system/cpu/cpu[0-9]*/online; do
	[ -e "$f" ] && [ "$(cat "$f")" = 0 ] && echo 1 >"$f"
done
for f in /sys/devices/system/memory/memory[0-9]*/state; do
	[ -e "$f" ] && [ "$(cat "$f")" = offline ] && { echo online_movable >"$f" 2>/dev/null || echo online >"$f"; }
done
log "online: $(nproc) CPUs, $(sed -n 's/^MemTotal: *//p' /proc/meminfo)"

WORKLOAD=
POWEROFF=
IP=10.0.2.15/24
GW=10.0.2.2
PORT=7080
LISTEN=
INFORMANT_ARGS=
for w in $(cat /proc/cmdline); do
	v=${w#*=}
	case "$w" in
	vmscale.workload=*) WORKLOAD=$(echo "$v" | tr , ' ') ;;
	vmscale.poweroff=*) POWEROFF=$v ;;
	vmscale.ip=*) IP=$v ;;
	vmscale.gw=*) GW=$v ;;
	vmscale.port=*) PORT=$v ;;
	vmscale.listen=*) LISTEN=$v ;;
	vmscale.informant=*) INFORMANT_ARGS=$(echo "$v" | tr , ' ') ;;
	esac
done

ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
	if ip link set eth0 up && ip addr add "$IP" dev eth0 && ip route add default via "$GW"; then
		log "eth0 $IP, gateway $GW"
	else
		log "network setup failed"
	fi
else
	log "no network device (eth0)"
fi

# OOM kills, as the console no longer shows the kernel's report: every
# kill /proc/vmstat counts (oom_kill) is printed with the kernel's own
# "Killed process ..." line from dmesg, or a line saying it fell out of the
# log, so a host counting "Killed process" on the console misses none.
# Checked twice a second: a fork of grep is cheap enough under TCG.
oom_count() {
	sed -n 's/^oom_kill //p' /proc/vmstat
}
if [ -n "$(oom_count)" ]; then
	(
		seen=0
		while :; do
			n=$(oom_count)
			if [ "$n" -gt "$seen" ]; then
				# The counter moves just before the kernel logs the kill.
				sleep 0.1
				k=$((n - seen))
				lines=$(dmesg | grep 'Killed process' | tail -n "$k")
				m=0
				[ -n "$lines" ] && m=$(echo "$lines" | wc -l)
				echo "$lines" | while read -r l; do
					[ -n "$l" ] && log "oom: $l"
				done
				# One line per kill, even when dmesg lost the kernel's.
				while [ "$m" -lt "$k" ]; do
					log "oom: Killed process (the kernel's line fell out of dmesg)"
					m=$((m + 1))
				done
				seen=$n
			fi
			sleep 0.5
		done
	) &
	log "oom watch started: every kill /proc/vmstat counts gets an 'oom:' line"
else
	log "no oom_kill in /proc/vmstat: OOM kills cannot be reported"
fi

# The informant: restarted if it ever exits. The eBPF object lies next to
# the binary, where it looks by default.
[ -n "$LISTEN" ] || LISTEN="tcp:0.0.0.0:$PORT"
case "$LISTEN" in
tcp:*)
	# A test guest on the harness's own network: the informant serves TCP in
	# plain text only when told so (production guests listen on vsock).
	INFORMANT_ARGS="--insecure $INFORMANT_ARGS"
	;;
vsock:*)
	# /dev/vsock appears with the transport; say which CID the guest has.
	[ -e /sys/module/vmw_vsock_virtio_transport ] || log "no virtio vsock transport: the informant cannot listen on $LISTEN"
	;;
esac
(
	export NO_COLOR=1
	while :; do
		# shellcheck disable=SC2086 # INFORMANT_ARGS is a list of words
		vmscale-informant --listen "$LISTEN" --workload-cgroup /sys/fs/cgroup/workload $INFORMANT_ARGS
		log "informant exited (status $?); restarting in 1 s"
		sleep 1
	done
) &
log "informant starting on $LISTEN"

# The host's root, read-only, if QEMU shares it (-virtfs ...,mount_tag=hostroot).
# A chroot into it needs its own /proc, /sys, /dev and writable /tmp, /run.
HOSTROOT=
if mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro hostroot /host 2>/dev/null; then
	mount -t proc proc /host/proc
	mount -t sysfs sysfs /host/sys
	mount -t cgroup2 cgroup2 /host/sys/fs/cgroup
	mount -t devtmpfs devtmpfs /host/dev
	for d in /host/tmp /host/run /host/dev/shm; do
		mount -t tmpfs -o mode=1777 tmpfs "$d"
	done
	HOSTROOT=/host
	log "host root mounted read-only at /host"
fi

# The workload, in its cgroup: `sh -c` moves itself there, then becomes it.
in_workload_cgroup() {
	sh -c 'echo $$ >/sys/fs/cgroup/workload/cgroup.procs && exec "$@"' workload "$@"
}
if [ -n "$WORKLOAD" ]; then
	# shellcheck disable=SC2086 # WORKLOAD is a list of words
	set -- $WORKLOAD
	[ -n "$HOSTROOT" ] && set -- chroot "$HOSTROOT" "$@"
	log "workload starting: $*"
	in_workload_cgroup "$@"
	log "workload exited (status $?)"
	if [ -n "$POWEROFF" ] && [ "$POWEROFF" != 0 ]; then
		log "powering off"
		poweroff -f
	fi
else
	log "no workload (vmscale.workload=...): idling"
	in_workload_cgroup sh -c 'while :; do sleep 3600; done' &
fi

# PID 1 never exits (the kernel would panic); waiting also reaps orphans.
while :; do
	sleep 3600
done
