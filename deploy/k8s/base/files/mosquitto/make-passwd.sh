#!/bin/sh
# Init container of kvgate-mosquitto: builds the broker's hashed password file from Secret
# kvgate-mqtt (mounted at /secrets) and the pool list kvgate-mqtt-pools (mounted at /pools; one line
# "<pool> <max workers>" per worker pool, written by the overlay). Users:
#   kvgate-scheduler            password /secrets/scheduler
#   kvgate-worker-<pool>-<n>    password /secrets/worker-<pool>, for n in 0 .. max-1
#                               (the pod names of StatefulSet kvgate-worker-<pool>)
set -eu
umask 077
out=/mosquitto/auth/passwd
: > "$out"
printf 'kvgate-scheduler:%s\n' "$(cat /secrets/scheduler)" >> "$out"
users=0
# `|| [ -n "$pool" ]`: also the last line when the file does not end in a newline.
while read -r pool max || [ -n "$pool" ]; do
  case "$pool" in ""|\#*) continue ;; esac
  password=$(cat "/secrets/worker-$pool")
  i=0
  while [ "$i" -lt "$max" ]; do
    printf 'kvgate-worker-%s-%s:%s\n' "$pool" "$i" "$password" >> "$out"
    i=$((i + 1))
    users=$((users + 1))
  done
done < /pools/pools
mosquitto_passwd -U "$out"
echo "mosquitto: password file with kvgate-scheduler and $users worker users"