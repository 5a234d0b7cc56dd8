#!/usr/bin/env bash
# Makes the base image that the Containerfile starts FROM when no container registry is reachable.
#
#   deploy/base-image.sh            reuse the image if it exists, else build it; print its name
#   deploy/base-image.sh --force    build it again
#
# The image is a Debian trixie minbase root filesystem (debootstrap, from the Debian mirror apt
# already uses) with python3, a venv in /opt/python first on PATH (Debian refuses `pip install`
# into the system Python), ca-certificates and apt. It is tagged like the official image,
# docker.io/library/python:3.13-slim, so `podman build --pull=never` uses it for the Containerfile's
# FROM unchanged. Where a registry is reachable you do not need this script: podman pulls the real
# image. An existing image under that name (pulled or made here) is always reused.
# Needs root, podman, debootstrap (./dev test installs them). ~35 s, ~270 MB of temporary disk.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
IMAGE=${PORTCULLIS_BASE_IMAGE:-docker.io/library/python:3.13-slim}
SUITE=${PORTCULLIS_BASE_SUITE:-trixie}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$HERE/containers.conf}

die() { echo "base-image: $*" >&2; exit 1; }

force=0
case "${1:-}" in
    --force) force=1 ;;
    "") ;;
    *) sed -n '2,6p' "$0" >&2; exit 2 ;;
esac

command -v podman >/dev/null 2>&1 || die "podman is not installed (apt-get install podman runc)"
if [ "$force" = 0 ] && podman image exists "$IMAGE"; then
    echo "$IMAGE"; exit 0
fi
[ "$(id -u)" = 0 ] || die "building $IMAGE needs root (debootstrap and chroot)"
command -v debootstrap >/dev/null 2>&1 || die "debootstrap is not installed (apt-get install debootstrap)"

mirror() {
    # The first Debian archive apt is configured with (deb822 .sources or one-line sources.list).
    local uri
    uri=$( (cat /etc/apt/sources.list.d/*.sources 2>/dev/null || true) \
        | awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) print $i }' | grep -v security | head -n1)
    if [ -z "$uri" ]; then
        uri=$( (cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true) \
            | awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; break } }' \
            | grep -v security | head -n1)
    fi
    echo "${PORTCULLIS_DEBIAN_MIRROR:-${uri:-http://deb.debian.org/debian}}"
}

# One build at a time on this machine (parallel test sessions share the image store).
exec 9>/var/tmp/portcullis-base-image.lock
flock 9
if [ "$force" = 0 ] && podman image exists "$IMAGE"; then
    echo "$IMAGE"; exit 0
fi

MIRROR=$(mirror)
ROOTFS=$(mktemp -d /var/tmp/portcullis-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
echo "base-image: debootstrap $SUITE from $MIRROR (about half a minute)" >&2
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 || {
    tail -n 20 "$ROOTFS.log" >&2; rm -f "$ROOTFS.log"; die "debootstrap failed"; }
rm -f "$ROOTFS.log"
chroot "$ROOTFS" python3 -m venv /opt/python
security=${MIRROR%/debian}/debian-security
cat >"$ROOTFS/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $security $SUITE-security main
EOF
# What the official slim images leave out too: package caches, lists, docs, man pages.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
    "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/*
tar -C "$ROOTFS" --numeric-owner -c . | podman import --quiet \
    --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "Debian $SUITE minbase + python3 venv (deploy/base-image.sh)" \
    - "$IMAGE" >/dev/null
echo "$IMAGE"
