#!/usr/bin/env bash
# Build the kvgate container images.
#
#   bash deploy/build-images.sh [all]      # auto-detect registry access, build everything
#   bash deploy/build-images.sh base       # only the debootstrap base kvgate/base:bookworm
#   bash deploy/build-images.sh wheelhouse # only deploy/.build/wheelhouse
#   KVGATE_OFFLINE=1 bash deploy/build-images.sh   # force the offline path
#   KVGATE_OFFLINE=0 bash deploy/build-images.sh   # force the public-image path
#
# With a registry (online path): pulls python:3.11-slim, redis:7-bookworm and
# eclipse-mosquitto:2 and haproxy:2.8 and builds kvgate/app:local on python:3.11-slim.
#
# Without a registry (offline path): debootstraps Debian bookworm (python3,
# python3-venv, redis-server, mosquitto, haproxy) into kvgate/base:bookworm (only if
# that image does not exist yet), builds kvgate/redis:local, kvgate/mosquitto:local
# and kvgate/haproxy:local from it, and builds kvgate/app:local on it.
#
# Both paths build a wheelhouse on the host (deploy/.build/wheelhouse: the kvgate
# wheel + all runtime dependencies) which the app Dockerfile installs from with
# --no-index, and write deploy/.build/images.env for compose and the tests.
#
# Environment:
#   KVGATE_OFFLINE=1|0       force offline/online path (default: try `docker pull`)
#   KVGATE_APP_IMAGE         app image tag (default kvgate/app:local)
#   KVGATE_REBUILD_BASE=1    re-debootstrap kvgate/base:bookworm even if it exists
#   KVGATE_DEBIAN_MIRROR     Debian mirror (default http://deb.debian.org/debian)
#   KVGATE_PULL_TIMEOUT      seconds for the registry probe (default 15)
#   VENV                     host venv used to build wheels (default <repo>/.venv)
set -euo pipefail

DEPLOY_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$DEPLOY_DIR/.." && pwd)
BUILD_DIR="$DEPLOY_DIR/.build"
WHEELHOUSE="$BUILD_DIR/wheelhouse"
IMAGES_ENV="$BUILD_DIR/images.env"

VENV=${VENV:-.venv}
case "$VENV" in /*) ;; *) VENV="$REPO_ROOT/$VENV" ;; esac

PUBLIC_BASE_IMAGE=python:3.11-slim
PUBLIC_REDIS_IMAGE=redis:7-bookworm
PUBLIC_MOSQUITTO_IMAGE=eclipse-mosquitto:2
PUBLIC_HAPROXY_IMAGE=haproxy:2.8

LOCAL_BASE_IMAGE=kvgate/base:bookworm
LOCAL_REDIS_IMAGE=kvgate/redis:local
LOCAL_MOSQUITTO_IMAGE=kvgate/mosquitto:local
LOCAL_HAPROXY_IMAGE=kvgate/haproxy:local
APP_IMAGE=${KVGATE_APP_IMAGE:-kvgate/app:local}

DEBIAN_SUITE=bookworm
DEBIAN_MIRROR=${KVGATE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_PACKAGES=python3,python3-venv,redis-server,mosquitto,mosquitto-clients,haproxy,ca-certificates
# Bump BASE_REVISION when the rootfs clean-up / import settings change; together
# with the suite and package list it is stored as a label on the base image, and a
# mismatch triggers a rebuild.
BASE_REVISION=2
BASE_SPEC="rev=$BASE_REVISION suite=$DEBIAN_SUITE packages=$BASE_PACKAGES"

# ---------------------------------------------------------------------------
# progress output
T_START=$(date +%s.%N)
since() { awk -v t0="$1" -v t1="$(date +%s.%N)" 'BEGIN { printf "%.1f", t1 - t0 }'; }
log() { printf '[build-images +%6ss] %s\n' "$(since "$T_START")" "$*"; }
die() { log "ERROR: $*" >&2; exit 1; }
STEP_NAME="" STEP_T0=""
step_begin() { STEP_NAME=$1; STEP_T0=$(date +%s.%N); log "==> $STEP_NAME"; }
step_end() { log "<== $STEP_NAME: done in $(since "$STEP_T0")s"; }

# The legacy builder prints a deprecation banner on newer CLIs; it is just noise here.
docker_build() {
    docker build "$@" 2>&1 | { grep -vE '^DEPRECATED: The legacy builder|^ +Install the buildx|^ +https://docs.docker.com/go/buildx|^$' || true; }
    return "${PIPESTATUS[0]}"
}

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo)
fi

TMP_DIRS=()
cleanup() {
    local d
    for d in "${TMP_DIRS[@]+"${TMP_DIRS[@]}"}"; do
        [ -n "$d" ] && [ -d "$d" ] && "${SUDO[@]+"${SUDO[@]}"}" rm -rf --one-file-system "$d"
    done
    return 0
}
trap cleanup EXIT

# ---------------------------------------------------------------------------
detect_mode() {
    step_begin "detect registry access"
    case "${KVGATE_OFFLINE:-}" in
        1 | true | yes) OFFLINE=1; log "KVGATE_OFFLINE=${KVGATE_OFFLINE}: offline path forced" ;;
        0 | false | no) OFFLINE=0; log "KVGATE_OFFLINE=${KVGATE_OFFLINE}: online path forced" ;;
        "")
            if timeout "${KVGATE_PULL_TIMEOUT:-15}" docker pull -q "$PUBLIC_BASE_IMAGE" >/dev/null 2>&1; then
                OFFLINE=0; log "registry reachable (pulled $PUBLIC_BASE_IMAGE): online path"
            else
                OFFLINE=1; log "registry NOT reachable (docker pull $PUBLIC_BASE_IMAGE failed): offline path"
            fi
            ;;
        *) die "KVGATE_OFFLINE must be 1 or 0 (got '${KVGATE_OFFLINE}')" ;;
    esac
    step_end
}

pull_public_images() {
    step_begin "pull public images"
    local img
    for img in "$PUBLIC_BASE_IMAGE" "$PUBLIC_REDIS_IMAGE" "$PUBLIC_MOSQUITTO_IMAGE" "$PUBLIC_HAPROXY_IMAGE"; do
        log "docker pull $img"
        docker pull -q "$img" >/dev/null || die "docker pull $img failed (set KVGATE_OFFLINE=1 to build local images)"
    done
    step_end
}

build_base_image() {
    step_begin "base image $LOCAL_BASE_IMAGE"
    if have_image "$LOCAL_BASE_IMAGE" && [ "${KVGATE_REBUILD_BASE:-0}" != 1 ]; then
        local have_spec
        have_spec=$(docker image inspect -f '{{ index .Config.Labels "org.kvgate.base.spec" }}' "$LOCAL_BASE_IMAGE")
        if [ "$have_spec" = "$BASE_SPEC" ]; then
            log "$LOCAL_BASE_IMAGE already exists, skipping debootstrap (KVGATE_REBUILD_BASE=1 to force)"
            step_end
            return
        fi
        log "$LOCAL_BASE_IMAGE exists but was built from a different spec ('$have_spec'); rebuilding"
    fi
    command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] \
        || die "debootstrap not found (apt-get install debootstrap)"
    local debootstrap
    debootstrap=$(command -v debootstrap || echo /usr/sbin/debootstrap)

    local work rootfs cache
    work=$(mktemp -d "${TMPDIR:-/var/tmp}/kvgate-base.XXXXXX")
    TMP_DIRS+=("$work")
    rootfs="$work/rootfs"
    cache="$BUILD_DIR/debootstrap-cache"   # .deb cache: makes a forced rebuild much faster
    mkdir -p "$cache"

    log "debootstrap --variant=minbase $DEBIAN_SUITE ($BASE_PACKAGES) from $DEBIAN_MIRROR"
    local t0 logf
    t0=$(date +%s.%N)
    logf="$BUILD_DIR/debootstrap.log"
    # debootstrap is chatty; keep its full output in a log and show every 40th line.
    if ! "${SUDO[@]+"${SUDO[@]}"}" "$debootstrap" --variant=minbase --include="$BASE_PACKAGES" \
        --cache-dir="$cache" "$DEBIAN_SUITE" "$rootfs" "$DEBIAN_MIRROR" 2>&1 \
        | tee "$logf" | awk 'NR % 40 == 1 { print "    debootstrap: " $0; fflush() }'; then
        tail -n 30 "$logf" >&2
        die "debootstrap failed (full log: $logf)"
    fi
    log "debootstrap finished in $(since "$t0")s"

    log "shrinking rootfs (apt lists/caches, docs, man pages, locales, logs)"
    "${SUDO[@]+"${SUDO[@]}"}" bash -euo pipefail -c '
        r=$1
        chmod 0755 "$r"
        rm -rf "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/* "$r"/var/cache/debconf/*-old \
               "$r"/var/lib/dpkg/*-old "$r"/var/log/* "$r"/debootstrap \
               "$r"/usr/share/doc/* "$r"/usr/share/man/* "$r"/usr/share/info/* \
               "$r"/usr/share/lintian "$r"/usr/share/linda "$r"/tmp/* "$r"/var/tmp/*
        find "$r"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
        mkdir -p "$r"/var/lib/apt/lists/partial "$r"/var/cache/apt/archives/partial
        # Like the official debian images: keep later apt installs small too.
        cat > "$r"/etc/dpkg/dpkg.cfg.d/docker-nodoc <<EOF
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
        cat > "$r"/etc/apt/apt.conf.d/docker-clean <<EOF
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";
EOF
        printf "APT::Install-Recommends \"false\";\n" > "$r"/etc/apt/apt.conf.d/docker-no-recommends
        # Data/config dirs of the service images, created here (not with RUN in
        # redis.Dockerfile / mosquitto.Dockerfile) so those builds are COPY-only and fast.
        uid() { awk -F: -v u="$2" '\''$1 == u { print $3 ":" $4 }'\'' "$1"/etc/passwd; }
        install -d -m 0755 "$r"/data "$r"/mosquitto/config "$r"/mosquitto/data "$r"/mosquitto/log
        chown "$(uid "$r" redis)" "$r"/data
        chown -R "$(uid "$r" mosquitto)" "$r"/mosquitto
        : > "$r"/etc/machine-id
        rm -f "$r"/etc/hostname "$r"/etc/resolv.conf
    ' _ "$rootfs"
    log "rootfs size: $("${SUDO[@]+"${SUDO[@]}"}" du -sh "$rootfs" | cut -f1)"

    log "docker import -> $LOCAL_BASE_IMAGE"
    "${SUDO[@]+"${SUDO[@]}"}" tar -C "$rootfs" --numeric-owner -c . \
        | docker import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV LANG=C.UTF-8' \
            --change 'ENV DEBIAN_FRONTEND=noninteractive' \
            --change "LABEL org.kvgate.base.spec=\"$BASE_SPEC\"" \
            --change "LABEL org.opencontainers.image.description=\"kvgate offline base: debian $DEBIAN_SUITE minbase + $BASE_PACKAGES\"" \
            --change 'CMD ["/bin/bash"]' \
            - "$LOCAL_BASE_IMAGE" >/dev/null
    "${SUDO[@]+"${SUDO[@]}"}" rm -rf --one-file-system "$work"
    step_end
}

# redis/mosquitto images only depend on the base image and deploy/{redis,mosquitto}:
# build them in the background, in parallel with the wheelhouse and app image.
SERVICE_PIDS=()
start_service_images() {
    log "==> service images $LOCAL_REDIS_IMAGE, $LOCAL_MOSQUITTO_IMAGE, $LOCAL_HAPROXY_IMAGE (in background)"
    SERVICE_T0=$(date +%s.%N)
    local name image
    for name in redis mosquitto haproxy; do
        image="kvgate/$name:local"
        docker_build -q -f "$DEPLOY_DIR/$name.Dockerfile" --build-arg "BASE_IMAGE=$LOCAL_BASE_IMAGE" \
            -t "$image" "$DEPLOY_DIR" >"$BUILD_DIR/$name-image.log" 2>&1 &
        SERVICE_PIDS+=("$name:$!")
    done
}

wait_service_images() {
    local entry name rc=0
    for entry in "${SERVICE_PIDS[@]}"; do
        name=${entry%%:*}
        if wait "${entry#*:}"; then
            log "built kvgate/$name:local"
        else
            cat "$BUILD_DIR/$name-image.log" >&2
            log "ERROR: docker build of kvgate/$name:local failed (log: $BUILD_DIR/$name-image.log)" >&2
            rc=1
        fi
    done
    [ "$rc" -eq 0 ] || exit 1
    log "<== service images: done in $(since "$SERVICE_T0")s (wall clock since start)"
}

build_wheelhouse() {
    step_begin "wheelhouse $WHEELHOUSE"
    [ -x "$VENV/bin/pip" ] || die "no pip in venv $VENV (create it, e.g. make venv, or set VENV=...)"
    local host_py target_py
    host_py=$("$VENV/bin/python" -c 'import platform; print(platform.python_version())')
    # The interpreter the app image will run (python:3.11-slim or Debian bookworm's python3).
    target_py=$(docker run --rm --network none --entrypoint python3 "$BASE_IMAGE" \
        -c 'import platform; print(platform.python_version())') \
        || die "cannot run python3 in $BASE_IMAGE"
    log "host venv python $host_py, image python $target_py"
    # Binary wheels (grpcio, protobuf) are built for the host's CPython minor version.
    [ "${host_py%.*}" = "${target_py%.*}" ] \
        || die "venv python $host_py does not match $BASE_IMAGE python $target_py (need the same 3.X)"

    # Build from a snapshot of the source tree: the repo is edited concurrently,
    # and building in place would leave build/ and *.egg-info in the checkout.
    local work snap out
    work=$(mktemp -d "${TMPDIR:-/tmp}/kvgate-wheel.XXXXXX")
    TMP_DIRS+=("$work")
    snap="$work/src"
    out=$(mktemp -d "$BUILD_DIR/wheelhouse.new.XXXXXX")   # unique: concurrent runs don't collide
    TMP_DIRS+=("$out")
    chmod 0755 "$out"
    mkdir -p "$snap"
    tar -C "$REPO_ROOT" \
        --exclude=./.git --exclude=./.venv --exclude=./deploy --exclude=./tests --exclude=./.ci \
        --exclude=./build --exclude=./dist --exclude='*.egg-info' --exclude=__pycache__ \
        --exclude=.mypy_cache --exclude=.ruff_cache --exclude=.pytest_cache --exclude=.hypothesis \
        -cf - . | tar -C "$snap" -xf -

    # SOURCE_DATE_EPOCH makes the kvgate wheel byte-reproducible, so an unchanged
    # source tree gives an identical build context and a fully cached docker build.
    local logf="$BUILD_DIR/pip-wheel.log"
    if ! SOURCE_DATE_EPOCH=315532800 PIP_DISABLE_PIP_VERSION_CHECK=1 \
        "$VENV/bin/pip" wheel --progress-bar off -w "$out" "$snap" >"$logf" 2>&1; then
        tail -n 40 "$logf" >&2
        die "pip wheel failed (full log: $logf)"
    fi
    ls "$out"/kvgate-*.whl >/dev/null 2>&1 || die "pip wheel produced no kvgate wheel"

    # pip evaluated environment markers for the host python; add what the image's
    # python needs on top (e.g. async-timeout for redis on python < 3.11.3).
    local round missing
    for round in 1 2 3 4 5; do
        missing=$("$VENV/bin/python" "$DEPLOY_DIR/wheelhouse-closure.py" "$out" "$target_py") \
            || die "wheelhouse-closure.py failed"
        [ -z "$missing" ] && break
        log "extra wheels for python $target_py: $(echo $missing)"
        # shellcheck disable=SC2086  # one requirement per line, no spaces inside
        PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/pip" wheel --progress-bar off -w "$out" \
            --find-links "$out" $missing >>"$logf" 2>&1 || { tail -n 40 "$logf" >&2; die "pip wheel (extras) failed"; }
    done
    [ -z "$missing" ] || die "wheelhouse still incomplete for python $target_py: $missing"

    # Replace the old wheelhouse atomically: no stale kvgate (or dependency) wheels.
    rm -rf "$WHEELHOUSE"
    mv "$out" "$WHEELHOUSE"
    log "$(find "$WHEELHOUSE" -name '*.whl' | wc -l) wheels: $(cd "$WHEELHOUSE" && ls *.whl | sed 's/-py3-none-any.whl//; s/-cp3.*//' | tr '\n' ' ')"
    step_end
}

build_app_image() {
    step_begin "app image $APP_IMAGE (FROM $BASE_IMAGE)"
    if ! docker_build -f "$DEPLOY_DIR/Dockerfile" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
        -t "$APP_IMAGE" "$WHEELHOUSE" 2>&1 | sed -u 's/^/    docker: /'; then
        die "docker build of $APP_IMAGE failed"
    fi
    step_end
}

write_env() {
    step_begin "write $IMAGES_ENV"
    local tmp="$IMAGES_ENV.tmp"
    {
        echo "# Generated by deploy/build-images.sh ($([ "$OFFLINE" = 1 ] && echo offline || echo online) path) - do not edit."
        echo "KVGATE_APP_IMAGE=$APP_IMAGE"
        echo "KVGATE_REDIS_IMAGE=$REDIS_IMAGE"
        echo "KVGATE_MOSQUITTO_IMAGE=$MOSQUITTO_IMAGE"
        echo "KVGATE_HAPROXY_IMAGE=$HAPROXY_IMAGE"
        echo "KVGATE_BASE_IMAGE=$BASE_IMAGE"
    } >"$tmp"
    mv "$tmp" "$IMAGES_ENV"
    sed 's/^/    /' "$IMAGES_ENV"
    step_end
}

# ---------------------------------------------------------------------------
select_images() {
    if [ "$OFFLINE" = 1 ]; then
        BASE_IMAGE=$LOCAL_BASE_IMAGE
        REDIS_IMAGE=$LOCAL_REDIS_IMAGE
        MOSQUITTO_IMAGE=$LOCAL_MOSQUITTO_IMAGE
        HAPROXY_IMAGE=$LOCAL_HAPROXY_IMAGE
    else
        BASE_IMAGE=$PUBLIC_BASE_IMAGE
        REDIS_IMAGE=$PUBLIC_REDIS_IMAGE
        MOSQUITTO_IMAGE=$PUBLIC_MOSQUITTO_IMAGE
        HAPROXY_IMAGE=$PUBLIC_HAPROXY_IMAGE
    fi
}

main() {
    local what=${1:-all}
    case "$what" in
        all | base | wheelhouse) ;;
        -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "usage: $0 [all|base|wheelhouse]" ;;
    esac
    docker info >/dev/null 2>&1 || die "cannot talk to the docker daemon"
    mkdir -p "$BUILD_DIR"

    if [ "$what" = base ]; then      # just the debootstrap base, whatever the registry says
        build_base_image
        log "done"
        return
    fi

    detect_mode
    select_images
    if [ "$what" = wheelhouse ]; then  # needs the base image only to learn its python version
        if [ "$OFFLINE" = 1 ]; then build_base_image; fi
        build_wheelhouse
        log "done"
        return
    fi

    if [ "$OFFLINE" = 1 ]; then
        build_base_image
        start_service_images
    else
        pull_public_images
    fi
    build_wheelhouse
    build_app_image
    if [ "$OFFLINE" = 1 ]; then
        wait_service_images
    fi
    write_env
    log "images:"
    local img
    for img in "$APP_IMAGE" "$REDIS_IMAGE" "$MOSQUITTO_IMAGE" "$HAPROXY_IMAGE" "$BASE_IMAGE"; do
        docker image ls "$img" --format '    {{.Repository}}:{{.Tag}}  {{.ID}}  {{.Size}}'
    done
    log "done (total $(since "$T_START")s)"
}

main "$@"
