# Memory ramp for `cargo xtask bench e2e`, run by the guest's /init as the
# workload (in the host's root, read-only over 9p; perl with Time::HiRes,
# which Debian's perl ships).
#
#   perl ramp.pl MIB_PER_S TARGET_MIB GO_FILE [WORKERS]
#
# Until GO_FILE exists it only watches MemTotal, so the host can time raw
# DIMM plugs against what the guest sees (the hotplug floor). Then WORKERS
# child processes (default 1) each allocate anonymous memory in 4 MiB chunks
# at MIB_PER_S / WORKERS (0: as fast as they can) up to their share of
# TARGET_MIB and hold it; more than one fills memory faster than one perl
# can under TCG. This process only watches: it reads /proc/meminfo every
# 5 ms and prints, by the guest's CLOCK_MONOTONIC in s:
#   bench: ready t=T total=MiB
#   bench: grew t=T total=MiB        MemTotal went up: new memory online
#   bench: shrank t=T total=MiB
#   bench: start t=T total=MiB
#   bench: cross90 t=T used=MiB total=MiB
#       use (MemTotal - MemAvailable) went from at most 90% of MemTotal to
#       above it; the next crossing counts only after memory grew, so each
#       crossing pairs with the first growth after it
#   bench: done t=T held=MiB         every worker holds its share
use strict;
use warnings;

$| = 1;
my ($rate, $target, $go, $workers) = @ARGV;
$workers = 1 unless $workers && $workers > 0;
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
printf("bench: ready t=%s total=%d clock=%s\n", ts(), $total, $have_hires ? 'monotonic' : 'uptime');
my ($started, $above, $pending, $finished) = (0, 0, 0, 0);
my ($done_r, $done_w);
my $rin = '';
while (1) {
    if (!$started && -e $go) {
        $started = 1;
        printf("bench: start t=%s total=%d\n", ts(), $total);
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
        printf("bench: grew t=%s total=%d\n", ts(), $nt);
        $pending = 0;
    } elsif ($nt < $total) {
        printf("bench: shrank t=%s total=%d\n", ts(), $nt);
    }
    $total = $nt;
    my $now_above = $nu > 0.9 * $nt ? 1 : 0;
    if ($started && $now_above && !$above && !$pending) {
        printf("bench: cross90 t=%s used=%d total=%d\n", ts(), $nu, $nt);
        $pending = 1;
    }
    $above = $now_above;
    if ($started && $finished < $workers) {
        # The 5 ms pause doubles as the wait for workers that are done.
        if (select(my $r = $rin, undef, undef, 0.005) > 0) {
            my $n = sysread($done_r, my $buf, 64);
            if ($n) {
                $finished += $n;
                printf("bench: done t=%s held=%d\n", ts(), $target) if $finished >= $workers;
            } else {
                # Every worker is gone (OOM-killed): nothing more to wait for.
                $finished = $workers;
            }
        }
    } else {
        select(undef, undef, undef, 0.005);
    }
}
