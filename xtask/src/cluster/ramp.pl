# Memory ramp for the vmscale test guest: the workload of the e2e scenarios,
# `cargo xtask bench e2e` and the demo, run by the guest's /init (in the
# host's root, read-only over 9p). Perl because it is on every Debian
# (perl-base is essential); Time::HiRes, which Debian's perl ships, for the
# clock where it is there.
#
#   perl ramp.pl MIB_PER_S TARGET_MIB [GO_FILE [WORKERS [PROGRESS_MIB]]]
#
# Until GO_FILE exists (none or empty: at once) it only watches MemTotal, so
# the host can time raw DIMM plugs against what the guest sees (the bench's
# hotplug floor). Then WORKERS child processes (default 1) each allocate
# anonymous memory in 4 MiB chunks at MIB_PER_S / WORKERS (0: as fast as
# they can) up to their share of TARGET_MIB and hold it; more than one fills
# memory faster than one perl can under TCG. This process only watches: it
# reads /proc/meminfo every 5 ms (every 0.5 s once every worker holds its
# share and no crossing waits for memory, so a held workload costs the
# guest's CPU nothing) and prints, by the guest's CLOCK_MONOTONIC in s:
#   ramp: ready t=T total=MiB
#   ramp: grew t=T total=MiB        MemTotal went up: new memory online
#   ramp: shrank t=T total=MiB
#   ramp: start t=T total=MiB
#   ramp: cross90 t=T used=MiB total=MiB
#       use (MemTotal - MemAvailable) went from at most 90% of MemTotal to
#       above it; the next crossing counts only after memory grew, so each
#       crossing pairs with the first growth after it
#   ramp: used=MiB total=MiB t=T    use grew by PROGRESS_MIB (default 0:
#                                   never) since the last such line
#   ramp: done t=T held=MiB         every worker holds its share
#
# Output is line-buffered to the serial console.

use strict;
use warnings;

$| = 1;
my ($rate, $target, $go, $workers, $progress) = @ARGV;
$workers = 1 unless $workers && $workers > 0;
$progress = 0 unless $progress && $progress > 0;
my $chunk = 4;
my $have_hires = eval { require Time::HiRes; 1 };
sub now {
    return Time::HiRes::clock_gettime(Time::HiRes::CLOCK_MONOTONIC()) if $have_hires;
    open(my $f, '<', '/proc/uptime') or return 0;
    my ($u) = split(/ /, <$f>);
    return $u + 0;
}
sub ts { return sprintf('%.4f', now()); }
sub meminfo {
    open(my $f, '<', '/proc/meminfo') or return (0, 0);
    my ($total, $avail) = (0, 0);
    while (<$f>) {
        $total = $1 if /^MemTotal:\s+(\d+)/;
        $avail = $1 if /^MemAvailable:\s+(\d+)/;
    }
    return ($total / 1024, ($total - $avail) / 1024);
}

# A worker: allocate its share, say so on the pipe, hold it until killed.
sub worker {
    my ($share, $my_rate, $done_w) = @_;
    my @held;
    my ($held, $t0) = (0, now());
    while ($held < $share) {
        if ($my_rate <= 0 || $held < (now() - $t0) * $my_rate) {
            my $s = "\x01" x ($chunk << 20);
            push @held, \$s;
            $held += $chunk;
        } else {
            select(undef, undef, undef, 0.002);
        }
    }
    syswrite($done_w, "1");
    sleep(3600) while 1;
}

my ($total, $used) = meminfo();
printf("ramp: ready t=%s total=%d clock=%s\n", ts(), $total, $have_hires ? 'monotonic' : 'uptime');
my ($started, $above, $pending, $finished, $shown) = (0, 0, 0, 0, 0);
my ($done_r, $done_w);
my $rin = '';
while (1) {
    if (!$started && (!defined $go || $go eq '' || -e $go)) {
        $started = 1;
        printf("ramp: start t=%s total=%d\n", ts(), $total);
        pipe($done_r, $done_w) or die "pipe: $!";
        for (1 .. $workers) {
            my $pid = fork();
            die "fork: $!" unless defined $pid;
            if ($pid == 0) {
                close($done_r);
                worker($target / $workers, $rate / $workers, $done_w);
            }
        }
        close($done_w);
        vec($rin, fileno($done_r), 1) = 1;
    }
    my ($nt, $nu) = meminfo();
    if ($nt > $total) {
        printf("ramp: grew t=%s total=%d\n", ts(), $nt);
        $pending = 0;
    } elsif ($nt < $total) {
        printf("ramp: shrank t=%s total=%d\n", ts(), $nt);
    }
    $total = $nt;
    my $now_above = $nu > 0.9 * $nt ? 1 : 0;
    if ($started && $now_above && !$above && !$pending) {
        printf("ramp: cross90 t=%s used=%d total=%d\n", ts(), $nu, $nt);
        $pending = 1;
    }
    $above = $now_above;
    if ($started && $progress > 0 && $nu >= $shown + $progress) {
        printf("ramp: used=%d total=%d t=%s\n", $nu, $nt, ts());
        $shown = $nu;
    }
    if ($started && $finished < $workers) {
        # The 5 ms pause doubles as the wait for workers that are done.
        if (select(my $r = $rin, undef, undef, 0.005) > 0) {
            my $n = sysread($done_r, my $buf, 64);
            if ($n) {
                $finished += $n;
                printf("ramp: done t=%s held=%d\n", ts(), $target) if $finished >= $workers;
            } else {
                # Every worker is gone (OOM-killed): nothing more to wait for.
                $finished = $workers;
            }
        }
    } else {
        select(undef, undef, undef, $started && !$pending ? 0.5 : 0.005);
    }
}
