#!/bin/bash
# machine.sh - a minimal Debian 12 machine whose PID 1 is systemd, for testing the production path
# (`sudo ./install.sh`) on hosts whose own PID 1 is not systemd (CI containers, this project's boxes).
#
#   machine.sh check                   exit 0 if this host can run it, else print why (exit 1)
#   machine.sh image                   build the image if it is not cached; print its directory
#   machine.sh boot STATE IMAGE [--bind=SRC:DST]...
#                                      boot IMAGE (read-only, changes go to a tmpfs overlay and vanish at
#                                      power-off) with systemd as its PID 1; STATE is a directory for pid
#                                      files and the console log; waits until the system is running
#   machine.sh run STATE CMD...        run CMD inside as root (a clean login-like environment)
#   machine.sh poweroff STATE          power it off, kill what is left, remove its cgroups
#
# The image: `debootstrap bookworm` from this host's own Debian mirror with only what a minimal Debian 12
# server has (systemd, dbus, libpam-systemd, python3, curl, ca-certificates: no compilers, no
# python3-venv), plus this host's extra CA certificates and pip settings so that pip and apt inside
# behave as they do outside. It is cached in $LLM_ROUTER_PID1_CACHE (default
# /var/cache/llm-router-tests/pid1) under a key of the package list, this script's build recipe and the
# host settings copied in: change any of them and the next run builds a new image (older ones are
# removed). Building takes about a minute and ~360 MB.
#
# How it boots on a host without systemd as PID 1: `systemd-nspawn --register=no --keep-unit` (no
# machined, no system bus to ask for a scope), in a cgroup of its own (so power-off can remove every
# cgroup it made), sharing the host's network (pick free ports), `--volatile=overlay` (the cached
# image is never changed). Needs root, systemd-nspawn (systemd-container) and debootstrap.
set -euo pipefail

CACHE=${LLM_ROUTER_PID1_CACHE:-/var/cache/llm-router-tests/pid1}
SUITE=bookworm
PACKAGES=systemd,dbus,libpam-systemd,python3,ca-certificates,curl,iproute2
# local pip indexes of the host, if it has them: bound read-only at the same place, so pip.conf works
PIP_DIRS=(/opt/wheels /opt/pypi /opt/pypi-more)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
SELF=$HERE/$(basename "${BASH_SOURCE[0]}")

say() { echo "pid1: $*" >&2; }
die() { echo "pid1: $*" >&2; exit 1; }

cmd_check() {
    [ "$(id -u)" = 0 ] || { echo "needs root (systemd-nspawn)"; return 1; }
    command -v systemd-nspawn >/dev/null || { echo "systemd-nspawn is not installed (apt-get install --no-install-recommends systemd-container)"; return 1; }
    command -v debootstrap >/dev/null || { echo "debootstrap is not installed (apt-get install debootstrap)"; return 1; }
    command -v nsenter >/dev/null || { echo "nsenter is not installed (util-linux)"; return 1; }
    [ -n "$(cg2_mount)" ] || { echo "no cgroup2 hierarchy is mounted"; return 1; }
    [ "$(readlink /proc/1/ns/pid)" = "$(readlink /proc/self/ns/pid)" ] || [ -w /sys/fs/cgroup ] \
        || { echo "the cgroup file system is read-only here"; return 1; }
    return 0
}

# --- the image ----------------------------------------------------------------------------------------
host_mirror() {
    local m
    m=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$m" ] || m=$(grep -hom1 'https\?://[^ ]*debian[^ ]*' /etc/apt/sources.list 2>/dev/null | head -n1 || true)
    echo "${m:-http://deb.debian.org/debian}"
}

extra_certs() { find /usr/local/share/ca-certificates -name '*.crt' -type f 2>/dev/null | sort; }

image_key() {
    {
        echo "$SUITE $PACKAGES $(host_mirror)"
        declare -f build_into     # the recipe itself
        local f
        for f in $(extra_certs) /etc/pip.conf /root/.config/pip/pip.conf; do
            [ ! -f "$f" ] || { echo "$f"; cat "$f"; }
        done
    } | sha256sum | cut -c1-16
}

build_into() { # DIR: a fresh minimal Debian 12
    local dir=$1 f
    debootstrap --include="$PACKAGES" "$SUITE" "$dir" "$(host_mirror)" >"$dir.log" 2>&1 \
        || { tail -n 20 "$dir.log" >&2; return 1; }
    for f in $(extra_certs); do cp "$f" "$dir/usr/local/share/ca-certificates/"; done
    chroot "$dir" update-ca-certificates >/dev/null 2>&1 || true
    [ ! -f /etc/pip.conf ] || cp /etc/pip.conf "$dir/etc/pip.conf"
    if [ -f /root/.config/pip/pip.conf ]; then
        mkdir -p "$dir/root/.config/pip"; cp /root/.config/pip/pip.conf "$dir/root/.config/pip/"
    fi
    echo pid1-test > "$dir/etc/hostname"
    : > "$dir/etc/machine-id"               # a fresh id at each boot (systemd writes it to the overlay)
    rm -f "$dir/var/lib/dbus/machine-id"
    chroot "$dir" apt-get clean
}

cmd_image() {
    local key dir tmp
    key=$(image_key)
    dir=$CACHE/debian12-$key
    mkdir -p "$CACHE"
    exec 9>"$CACHE/.lock"
    flock 9                                   # one build at a time; the others wait and reuse it
    if [ ! -x "$dir/lib/systemd/systemd" ]; then
        local t0=$SECONDS
        say "building the image $dir (debootstrap $SUITE from $(host_mirror); about a minute)"
        tmp=$CACHE/.building-$key
        rm -rf "$tmp" "$tmp.log"
        build_into "$tmp" || { rm -rf "$tmp"; die "debootstrap failed (log: $tmp.log)"; }
        rm -f "$tmp.log"
        mv "$tmp" "$dir"
        say "built in $((SECONDS - t0)) s"
        for old in "$CACHE"/debian12-*; do            # images of an older recipe
            [ "$old" = "$dir" ] || [ ! -d "$old" ] || { rm -rf "$old"; say "removed the outdated image $old"; }
        done
    fi
    echo "$dir"
}

# --- cgroups ------------------------------------------------------------------------------------------
cg2_mount() {
    local t
    for t in /sys/fs/cgroup /sys/fs/cgroup/unified; do
        [ "$(stat -fc %T "$t" 2>/dev/null)" != cgroup2fs ] || { echo "$t"; return; }
    done
    findmnt -rn -t cgroup2 -o TARGET 2>/dev/null | head -n1
}

# the hierarchies the container's processes are placed in: cgroup2, and on a hybrid host name=systemd
hierarchies() {
    cg2_mount
    [ "$(stat -fc %T /sys/fs/cgroup/systemd 2>/dev/null)" != cgroupfs ] || echo /sys/fs/cgroup/systemd
}

cg_clean() { # NAME: kill what is left in NAME in every hierarchy, then remove it, deepest first
    local h d
    for h in $(hierarchies); do
        d=$h/$1
        [ -d "$d" ] || continue
        if [ -e "$d/cgroup.kill" ]; then echo 1 > "$d/cgroup.kill" 2>/dev/null || true
        else find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true; fi
    done
    for _ in $(seq 50); do
        local busy=0
        for h in $(hierarchies); do
            [ ! -d "$h/$1" ] || find "$h/$1" -depth -type d -exec rmdir {} + 2>/dev/null || true
            [ ! -d "$h/$1" ] || busy=1
        done
        [ "$busy" = 1 ] || return 0
        sleep 0.1
    done
    say "warning: could not remove the cgroup $1"
}

cg_gc() { # remove the empty cgroups of machines whose power-off never ran (a killed test run)
    local h d
    for h in $(hierarchies); do
        for d in "$h"/llm-router-pid1-*; do
            [ -d "$d" ] && [ $(( $(date +%s) - $(stat -c %Y "$d") )) -ge 60 ] || continue
            find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true   # fails on any with processes
        done
    done
}

# --- boot, run, power off -------------------------------------------------------------------------------
cmd_boot() {
    local state=$1 image=$2; shift 2
    local binds=() d h name t0 nspawn leader=
    for d in "${PIP_DIRS[@]}"; do [ ! -d "$d" ] || binds+=("--bind-ro=$d"); done
    binds+=("$@")
    mkdir -p "$state"
    [ ! -e "$state/nspawn.pid" ] || die "$state: a machine is already booted there (power it off first)"
    cg_gc
    name=llm-router-pid1-$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
    echo "$name" > "$state/cgroup"
    for h in $(hierarchies); do mkdir -p "$h/$name"; done
    t0=$(date +%s.%N)
    # the nspawn process joins its own cgroup first (_nspawn): --keep-unit puts the container below it
    setsid "$SELF" _nspawn "$name" "$image" "${binds[@]}" >"$state/console.log" 2>&1 </dev/null &
    nspawn=$!
    echo "$nspawn" > "$state/nspawn.pid"
    for _ in $(seq 200); do
        leader=$(ps -o pid=,comm= --ppid "$nspawn" 2>/dev/null | awk '$2 == "systemd" { print $1; exit }' || true)
        [ -z "$leader" ] || break
        kill -0 "$nspawn" 2>/dev/null || break
        sleep 0.05
    done
    [ -n "$leader" ] || { cat "$state/console.log" >&2; cmd_poweroff "$state"; die "the container's PID 1 did not start"; }
    echo "$leader" > "$state/leader.pid"
    local st=
    for _ in $(seq 600); do
        st=$(nsenter -t "$leader" -a systemctl is-system-running 2>/dev/null || true)
        case $st in running|degraded) break ;; esac
        sleep 0.1
    done
    case $st in
        running) ;;
        degraded) say "warning: the machine is degraded: $(nsenter -t "$leader" -a systemctl --failed --no-legend --plain 2>&1 | tr '\n' ' ')" ;;
        *) cat "$state/console.log" >&2; cmd_poweroff "$state"; die "the machine did not finish booting (state: ${st:-unknown})" ;;
    esac
    say "booted in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s (state $st; PID 1 is host pid $leader)"
}

cmd__nspawn() { # NAME IMAGE [nspawn args]: join our own cgroup, then become systemd-nspawn
    local name=$1 image=$2 h; shift 2
    for h in $(hierarchies); do echo $$ > "$h/$name/cgroup.procs"; done
    exec systemd-nspawn --quiet -D "$image" --volatile=overlay -b --register=no --keep-unit \
        --console=passive --machine=pid1-test "$@"
}

cmd_run() {
    local state=$1; shift
    local leader pipenv=() v
    leader=$(cat "$state/leader.pid" 2>/dev/null) || die "no machine booted in $state"
    for v in $(env | grep -o '^PIP_[A-Z_]*' || true); do pipenv+=("$v=${!v}"); done
    exec nsenter -t "$leader" -a env -i HOME=/root USER=root LOGNAME=root SHELL=/bin/bash TERM=dumb \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "${pipenv[@]}" \
        bash -c 'cd /root && exec "$@"' bash "$@"
}

cmd_poweroff() {
    local state=$1 nspawn leader name
    nspawn=$(cat "$state/nspawn.pid" 2>/dev/null || true)
    leader=$(cat "$state/leader.pid" 2>/dev/null || true)
    name=$(cat "$state/cgroup" 2>/dev/null || true)
    if [ -n "$nspawn" ] && kill -0 "$nspawn" 2>/dev/null; then
        if [ -n "$leader" ]; then timeout 10 nsenter -t "$leader" -a systemctl --no-block poweroff >/dev/null 2>&1 || true; fi
        for _ in $(seq 200); do kill -0 "$nspawn" 2>/dev/null || break; sleep 0.05; done
        kill -TERM "$nspawn" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$nspawn" 2>/dev/null || break; sleep 0.05; done
    fi
    [ -z "$name" ] || cg_clean "$name"
    rm -f "$state/nspawn.pid" "$state/leader.pid" "$state/cgroup"
}

case ${1:-} in
    check) cmd_check ;;
    image) cmd_image ;;
    boot) shift; [ $# -ge 2 ] || die "usage: machine.sh boot STATE IMAGE [--bind=SRC:DST]..."; cmd_boot "$@" ;;
    _nspawn) shift; cmd__nspawn "$@" ;;
    run) shift; [ $# -ge 2 ] || die "usage: machine.sh run STATE CMD..."; cmd_run "$@" ;;
    poweroff) shift; [ $# -ge 1 ] || die "usage: machine.sh poweroff STATE"; cmd_poweroff "$@" ;;
    *) sed -n '2,15p' "$0" >&2; exit 2 ;;
esac
