# Fills the vmscale test guest's boot memory, then allocates again in new
# processes once the host has plugged DIMMs: does memory plugged into a full
# guest help it? Run by /init as the workload (in the host's root, read-only
# over 9p). Perl because it is on every Debian.
#
#   perl full.pl GO_FILE CHILDREN MIB_EACH
#
# GO_FILE holds the MemTotal (MiB) to wait for once it exists (up to 60 s):
# the plugged memory, online.
# Lines (guest clock t=, sizes in MiB; zones= lists each zone's free/managed):
#   full: start t=T total=M avail=M zones=...
#   full: filled t=T held=M total=M avail=M zones=...   (MemAvailable < 24 MiB)
# Once GO_FILE exists, CHILDREN processes allocate MIB_EACH each (4 MiB at a
# time) and hold it:
#   full: go t=T waited=S total=M avail=M zones=...
#   full: child N done t=T                              (one per child)
#   full: end t=T children=N total=M avail=M zones=...
# An OOM kill shows as /init's "oom:" line and as fewer children done. Once
# GO_FILE.free exists, the children are killed (their memory, in the plugged
# DIMMs, is free again for an unplug):
#   full: freed t=T total=M avail=M zones=...
# then it holds the rest until it is killed.
use strict;
use warnings;

$| = 1;
my ($go, $children, $mib_each) = @ARGV;
sub uptime { open(my $f, '<', '/proc/uptime') or return 0; my ($u) = split(/ /, <$f>); return $u + 0; }
sub meminfo {
    open(my $f, '<', '/proc/meminfo') or die "meminfo: $!";
    my %m;
    while (<$f>) { $m{$1} = $2 if /^(\w+):\s+(\d+)/; }
    return %m;
}
# Free and managed MiB of each zone with memory, from /proc/zoneinfo.
sub zones {
    open(my $f, '<', '/proc/zoneinfo') or return '?';
    my ($z, %free, %managed, @order);
    while (<$f>) {
        if (/^Node \d+, zone\s+(\w+)/) { $z = $1; push @order, $z; }
        elsif (defined $z && /^\s+pages free\s+(\d+)/) { $free{$z} = $1 * 4 / 1024; }
        elsif (defined $z && /^\s+managed\s+(\d+)/) { $managed{$z} = $1 * 4 / 1024; }
    }
    return join(',', map { sprintf('%s:%.0f/%.0f', $_, $free{$_} // 0, $managed{$_}) }
        grep { ($managed{$_} // 0) > 0 } @order);
}
sub state {
    my %m = meminfo();
    return sprintf('total=%d avail=%d zones=%s', $m{MemTotal} / 1024, $m{MemAvailable} / 1024, zones());
}
sub nap { select(undef, undef, undef, $_[0]); }

print "full: start t=" . uptime() . ' ' . state() . "\n";
my @held;
while (1) {
    my %m = meminfo();
    last if $m{MemAvailable} < 24 * 1024;
    push @held, 'x' x (4 << 20);
}
print "full: filled t=" . uptime() . ' held=' . (4 * @held) . ' ' . state() . "\n";
nap(0.05) until -e $go;
my $want = 0;
if (open(my $f, '<', $go)) { $want = (<$f> // 0) + 0; }
my $since = uptime();
while (1) {
    my %m = meminfo();
    last if $m{MemTotal} / 1024 >= $want || uptime() - $since > 60;
    nap(0.05);
}
print "full: go t=" . uptime() . ' waited=' . sprintf('%.2f', uptime() - $since) . ' ' . state() . "\n";

# Each child says "done" on the pipe, then holds its memory.
pipe(my $r, my $w) or die "pipe: $!";
my @pids;
for my $i (1 .. $children) {
    my $pid = fork() // die "fork: $!";
    if ($pid) { push @pids, $pid; next; }
    close $r;
    my @mine;
    push @mine, 'y' x (4 << 20) for 1 .. $mib_each / 4;
    print "full: child $i done t=" . uptime() . "\n";
    syswrite($w, "$i\n");
    sleep 1 while 1;
}
close $w;
# A line per child that got its memory; EOF only once every child has died
# (a killed child leaves the others holding the pipe: the host sees the
# kill on the console and stops waiting).
my $done = 0;
while ($done < $children) {
    my $l = <$r>;
    last unless defined $l;
    $done++;
}
print "full: end t=" . uptime() . " children=$done " . state() . "\n";
nap(0.05) until -e "$go.free";
kill 'KILL', @pids;
waitpid($_, 0) for @pids;
print "full: freed t=" . uptime() . ' ' . state() . "\n";
sleep 1 while 1;
