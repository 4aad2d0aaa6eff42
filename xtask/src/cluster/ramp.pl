# Memory ramp for the vmscale test guest, run by /init as the workload (in
# the host's root, read-only over 9p). Perl because it is on every Debian
# (perl-base is essential) and needs no module here.
#
#   perl ramp.pl MIB_PER_S TARGET_MIB [GO_FILE]
#
# Waits for GO_FILE to exist (the host creates it once the agent is
# connected), then allocates anonymous memory in 8 MiB chunks at MIB_PER_S
# (0: as fast as it can) up to TARGET_MIB, and holds it. It polls
# /proc/meminfo every 20 ms and prints, by the guest's own clock (uptime):
#   ramp: start t=T total=MiB
#   ramp: held=MiB used=MiB total=MiB t=T        (each chunk)
#   ramp: cross90 t=T used=MiB total=MiB         (use first past 90% of MemTotal)
#   ramp: grew t=T total=MiB                     (MemTotal went up: memory online)
#   ramp: done held=MiB t=T
use strict;
use warnings;

$| = 1;
my ($rate, $target, $go) = @ARGV;
my $chunk = 8;
sub uptime { open(my $f, '<', '/proc/uptime') or return 0; my ($u) = split(/ /, <$f>); return $u + 0; }
sub meminfo {
    open(my $f, '<', '/proc/meminfo') or return (0, 0);
    my ($total, $avail) = (0, 0);
    while (<$f>) {
        $total = $1 if /^MemTotal:\s+(\d+)/;
        $avail = $1 if /^MemAvailable:\s+(\d+)/;
    }
    return (int($total / 1024), int(($total - $avail) / 1024));
}
sub nap { select(undef, undef, undef, $_[0]); }

if (defined $go && $go ne '') {
    nap(0.2) until -e $go;
}
my @held;
my $held = 0;
my ($total, $used) = meminfo();
my $t0 = uptime();
my $crossed = 0;
print "ramp: start t=$t0 total=$total\n";
while (1) {
    my $now = uptime();
    if ($held < $target && ($rate <= 0 || $held < ($now - $t0) * $rate)) {
        my $s = "\x01" x ($chunk << 20);
        push @held, \$s;
        $held += $chunk;
        ($total, $used) = meminfo();
        print "ramp: held=$held used=$used total=$total t=" . uptime() . "\n";
        print "ramp: done held=$held t=" . uptime() . "\n" if $held >= $target;
    }
    my ($nt, $nu) = meminfo();
    if (!$crossed && $nu > 0.9 * $nt) {
        $crossed = 1;
        print "ramp: cross90 t=" . uptime() . " used=$nu total=$nt\n";
    }
    if ($nt > $total) {
        print "ramp: grew t=" . uptime() . " total=$nt\n";
    }
    $total = $nt;
    nap($held >= $target ? 0.5 : 0.02);
}
