# CPU load for the vmscale test guest, run by /init as the workload (in the
# host's root, read-only over 9p). Perl because it is on every Debian.
#
#   perl cpu.pl GO_FILE BUSY_S WORKERS
#
# Reports which CPUs the guest has online whenever that changes (and every
# 5 s), by the guest's own clock (uptime):
#   cpu: online=0-1 n=2 t=T load=L
# Once GO_FILE exists, WORKERS processes spin for BUSY_S seconds each:
#   load: start t=T workers=N busy=S
#   load: worker done t=T spins=N         (one per worker)
#   load: end t=T
# then it goes on reporting CPUs until it is killed.
use strict;
use warnings;

$| = 1;
my ($go, $busy, $workers) = @ARGV;
sub uptime { open(my $f, '<', '/proc/uptime') or return 0; my ($u) = split(/ /, <$f>); return $u + 0; }
sub first_line { open(my $f, '<', $_[0]) or return '?'; my $l = <$f>; chomp $l; return $l; }
sub count {
    my $n = 0;
    for (split(/,/, $_[0])) { $n += /^(\d+)-(\d+)$/ ? $2 - $1 + 1 : 1; }
    return $n;
}
sub nap { select(undef, undef, undef, $_[0]); }

my ($last, $said, $started, $ended) = ('', 0, 0, 0);
my @kids;
while (1) {
    my $now = uptime();
    my $online = first_line('/sys/devices/system/cpu/online');
    if ($online ne $last || $now - $said >= 5) {
        my ($la) = split(/ /, first_line('/proc/loadavg'));
        print "cpu: online=$online n=" . count($online) . " t=$now load=$la\n";
        ($last, $said) = ($online, $now);
    }
    if (!$started && -e $go) {
        $started = 1;
        print "load: start t=$now workers=$workers busy=$busy\n";
        for (1 .. $workers) {
            my $pid = fork();
            die "fork: $!" unless defined $pid;
            if ($pid == 0) {
                my $end = uptime() + $busy;
                my $spins = 0;
                while (uptime() < $end) { $spins++ for 1 .. 200000; }
                print "load: worker done t=" . uptime() . " spins=$spins\n";
                exit 0;
            }
            push @kids, $pid;
        }
    }
    if ($started && !$ended) {
        @kids = grep { waitpid($_, 1) == 0 } @kids;    # 1: WNOHANG
        if (!@kids) {
            $ended = 1;
            print "load: end t=" . uptime() . "\n";
        }
    }
    nap(0.25);
}
