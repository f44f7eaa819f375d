#!/usr/bin/env bash
# `make images`: builds the project image (default localhost/exocore:latest) with podman.
#
# 1. The base image: $EXO_BASE_IMAGE if set; else the public python:3.11-slim if it is present or
#    can be pulled; else (no image registry reachable) a local Debian bookworm base made with
#    debootstrap and `podman import` (needs root; built once, then reused while it exists).
# 2. A build context in build/image: the runtime dependencies of pyproject.toml installed from
#    cp311 wheels with `pip install --target`, the project's packages and the generated stubs.
# 3. `podman build -f deploy/Containerfile --build-arg BASE_IMAGE=<base>`.
#
# Environment: EXO_IMAGE (tag to build), EXO_BASE_IMAGE, PY (python of the venv), CONTAINERS_CONF
# (default deploy/containers.conf), EXO_CONTAINER_TOOL (podman, or docker: same commands).
set -euo pipefail
cd "$(dirname "$0")/.."

export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/deploy/containers.conf}"
PY="${PY:-.venv/bin/python}"
IMAGE="${EXO_IMAGE:-localhost/exocore:latest}"
TOOL="${EXO_CONTAINER_TOOL:-podman}"
PUBLIC_BASE="docker.io/library/python:3.11-slim"
LOCAL_BASE="localhost/exocore-base:bookworm"
STAGE="build/image"

exists() { "$TOOL" image inspect "$1" >/dev/null 2>&1; }

build_local_base() {
    if [ "$(id -u)" != 0 ]; then
        echo "error: building the local base image $LOCAL_BASE needs root (debootstrap);" \
            "run as root or set EXO_BASE_IMAGE to a Python 3.11 image" >&2
        exit 1
    fi
    command -v debootstrap >/dev/null || { echo "error: debootstrap is missing: make deploy-setup" >&2; exit 1; }
    local mirror rootfs started
    mirror="$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
    mirror="${mirror:-http://deb.debian.org/debian}"
    rootfs="$(mktemp -d /var/tmp/exocore-rootfs.XXXXXX)"
    trap 'rm -rf "$rootfs"' RETURN
    started=$(date +%s)
    echo "== building the local base image $LOCAL_BASE (debootstrap bookworm from $mirror)"
    debootstrap --variant=minbase --include=python3,ca-certificates bookworm "$rootfs" "$mirror" \
        > build/debootstrap.log 2>&1 || { tail -20 build/debootstrap.log >&2; exit 1; }
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/log/*.log
    tar -C "$rootfs" -c . | "$TOOL" import --change 'CMD ["/bin/bash"]' - "$LOCAL_BASE" >/dev/null
    echo "   done in $(( $(date +%s) - started ))s"
}

mkdir -p build
base="${EXO_BASE_IMAGE:-}"
if [ -z "$base" ]; then
    if exists "$PUBLIC_BASE" || "$TOOL" pull -q "$PUBLIC_BASE" >/dev/null 2>&1; then
        base="$PUBLIC_BASE"
    else
        echo "== no image registry reachable: the base image is a local Debian one ($LOCAL_BASE)"
        base="$LOCAL_BASE"
    fi
fi
if [ "$base" = "$LOCAL_BASE" ] && ! exists "$LOCAL_BASE"; then
    build_local_base
fi

echo "== build context $STAGE (runtime dependencies from cp311 wheels, packages, stubs)"
requirements="$("$PY" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')"
stamp="$(printf '%s\n' "$requirements" | sha256sum | cut -c1-16)"
if [ ! -f "$STAGE/site/.deps-$stamp" ]; then
    rm -rf "$STAGE/site"
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --disable-pip-version-check --target "$STAGE/site" --only-binary=:all: \
        --no-compile $requirements 2>&1 | { grep -v '^WARNING: Location' || true; }
    touch "$STAGE/site/.deps-$stamp"
fi
rm -rf "$STAGE/app" && mkdir -p "$STAGE/app"
for pkg in libs/exocommon/exocommon cli/exocli services/chain/exochain services/store/exostore \
    services/apphost/exoapphost services/gateway/exogateway libs/exocommon/gen/exocore; do
    cp -r "$pkg" "$STAGE/app/"
done
find "$STAGE/app" -name __pycache__ -type d -prune -exec rm -rf {} +
cp libs/exocommon/gen/exocore.fds "$STAGE/app/"
cp deploy/Containerfile "$STAGE/Containerfile"

echo "== $TOOL build $IMAGE (FROM $base)"
"$TOOL" build -q --build-arg BASE_IMAGE="$base" -t "$IMAGE" -f "$STAGE/Containerfile" "$STAGE" >/dev/null
echo "   $("$TOOL" image inspect --format '{{.Id}}' "$IMAGE" | cut -c1-12) $IMAGE"
