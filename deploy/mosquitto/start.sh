#!/bin/sh
# Start mosquitto with a password file built from $KVGATE_MQTT_USERS: whitespace-separated
# user:password pairs (deploy/make-env.sh generates them into deploy/.env). The file is
# rebuilt on every start, so rotating a password is: edit .env, recreate the container.
set -eu
: "${KVGATE_MQTT_USERS:?KVGATE_MQTT_USERS must list user:password pairs (run make env)}"
conf=${1:-/mosquitto/config/mosquitto.conf}
passwd=/mosquitto/data/passwd
umask 077
: >"$passwd"
for entry in $KVGATE_MQTT_USERS; do
    case "$entry" in
        ?*:?*) printf '%s\n' "$entry" >>"$passwd" ;;
        *) echo "start.sh: bad KVGATE_MQTT_USERS entry '${entry%%:*}' (want user:password)" >&2; exit 64 ;;
    esac
done
mosquitto_passwd -U "$passwd"   # hash the clear-text passwords in place
if [ "$(id -u)" = 0 ]; then
    chown mosquitto "$passwd"    # the public image starts as root and drops to mosquitto
fi
exec mosquitto -c "$conf"
