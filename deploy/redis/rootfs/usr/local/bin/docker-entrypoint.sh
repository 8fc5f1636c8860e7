#!/bin/sh
# Entrypoint of kvgate/redis:local (offline image built on kvgate/base:bookworm).
# Like the official redis image it accepts `redis-server [args...]`, bare
# `--flag value` arguments (treated as redis-server args) or any other command.
# When redis-server is started without an explicit *.conf file, our config
# (listen on 0.0.0.0, protected-mode off, dir /data) is prepended so the
# container is reachable from other containers and the host like the public one.
set -e
CONF=/etc/redis/kvgate.conf

if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
    set -- redis-server "$@"
fi

if [ "$1" = redis-server ] || [ "$1" = /usr/bin/redis-server ]; then
    shift
    case "${1:-}" in
        *.conf|-v|--version|-h|--help|--test-memory|--check-system) ;;
        *) set -- "$CONF" "$@" ;;
    esac
    set -- redis-server "$@"
fi

exec "$@"
