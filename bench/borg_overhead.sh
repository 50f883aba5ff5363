#!/usr/bin/env bash
# Where the Borg engine's time goes: the same workload (bench/workload.py) backed up, changed 1%,
# backed up again and restored by (a) plain borg on a local repository, (b) plain borg through
# `borg serve` over BORG_RSH (the remote protocol the worker model needs, no sandbox, no hub),
# (c) qbhub --engine borg (sandboxed worker + sandboxed borg serve, dom0 checks), and (d) plain
# borg's incremental again with its cache deleted first (what a worker without a kept cache pays).
# Usage: bench/borg_overhead.sh [SIZE]   (default 512MiB; run as root on a quiet machine)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
size=${1:-512MiB}
work=$(mktemp -d /var/tmp/qbhub-borg-overhead-XXXXXX)
trap 'rm -rf "$work"; [ -z "${cg:-}" ] || rmdir "$cg" 2>/dev/null || true' EXIT
py=$PWD/.venv/bin/python
qbhub=$PWD/.venv/bin/qbhub
export BORG_PASSPHRASE=bench QBHUB_PASSPHRASE=bench QBHUB_HOME=$work/home
export BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
opts=(--chunker-params fixed,65536 --compression zstd,3 --read-special --sparse)
cg=/sys/fs/cgroup/cpuacct/qbhub-borg-overhead-$$
mkdir -p "$cg" 2>/dev/null || cg=""
measure() {  # label, command...: wall, CPU of the whole process tree (cpuacct cgroup: bwrap's
  # user namespaces hide the sandboxes' CPU from wait4), peak RSS of the largest waited process
  local label=$1; shift
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  [ -z "$cg" ] || echo 0 > "$cg/cpuacct.usage"
  /usr/bin/time -f "%e %M" sh -c '[ -z "$1" ] || echo $$ > "$1/cgroup.procs"; shift; exec "$@"' \
    sh "$cg" "$@" >/dev/null 2>"$work/t" || { cat "$work/t"; exit 1; }
  local cpu=n/a
  [ -z "$cg" ] || cpu=$(awk '{printf "%.2f", $1 / 1e9}' "$cg/cpuacct.usage")
  read -r wall rss < <(tail -n 1 "$work/t")
  echo "$label: wall $wall s, cpu (tree) $cpu s, max rss $((rss / 1024)) MiB"
}
fresh_image() { $py "$root/bench/workload.py" build "$work/image.img" --size "$size" >/dev/null; }
cat > "$work/rsh" <<RSH
#!/bin/sh
exec borg serve --restrict-to-repository "$work/remote"
RSH
chmod +x "$work/rsh"

fresh_image
export BORG_BASE_DIR=$work/local-base
borg init -e repokey-blake2 "$work/local" >/dev/null 2>&1
cd "$work"
measure "plain-local full" borg create "${opts[@]}" local::s1 image.img
$py "$root/bench/workload.py" mutate image.img --size "$size" >/dev/null
measure "plain-local incremental" borg create "${opts[@]}" local::s2 image.img
measure "plain-local restore" sh -c 'borg extract --stdout local::s2 image.img > out.img'
rm -rf "$work/local-base/.cache"
measure "plain-local incremental, no cache" borg create "${opts[@]}" local::s3 image.img
cd "$OLDPWD"

fresh_image
export BORG_BASE_DIR=$work/remote-base BORG_RSH=$work/rsh
borg init -e repokey-blake2 "ssh://x$work/remote" >/dev/null 2>&1
cd "$work"
measure "plain-serve full" borg create "${opts[@]}" "ssh://x$work/remote::s1" image.img
$py "$root/bench/workload.py" mutate image.img --size "$size" >/dev/null
measure "plain-serve incremental" borg create "${opts[@]}" "ssh://x$work/remote::s2" image.img
measure "plain-serve restore" sh -c "borg extract --stdout ssh://x$work/remote::s2 image.img > out.img"
rm -rf "$work/remote-base/.cache"
measure "plain-serve incremental, no cache" borg create "${opts[@]}" "ssh://x$work/remote::s3" image.img
cd "$OLDPWD"
unset BORG_RSH BORG_BASE_DIR

fresh_image
$qbhub init --engine borg --dest "$work/engine" >/dev/null
measure "engine full" $qbhub volume backup --dest "$work/engine" "$work/image.img"
$py bench/workload.py mutate "$work/image.img" --size "$size" >/dev/null
measure "engine incremental" $qbhub volume backup --dest "$work/engine" "$work/image.img"
rm -f "$work/out.img"
measure "engine restore" $qbhub volume restore --dest "$work/engine" image.img --to "$work/out.img"
cmp "$work/image.img" "$work/out.img" && echo "engine restore bit-exact"
measure "engine list" $qbhub list --dest "$work/engine"
du -sb "$work/local" "$work/remote" "$work/engine/borg" | sed "s|$work/||"
