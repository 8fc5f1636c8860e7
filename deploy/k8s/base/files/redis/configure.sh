#!/bin/sh
# Init container of every kvgate-redis pod: writes /conf/redis.conf and /conf/sentinel.conf.
# The primary is whoever the running Sentinels say it is; only when no Sentinel answers (the set's
# first start, or all three pods restarted at once) does pod 0 become the primary.
set -eu
SVC="kvgate-redis-headless.${POD_NAMESPACE}.svc.cluster.local"
ME="${POD_NAME}.${SVC}"
PRIMARY=""
for i in 0 1 2; do
  PEER="kvgate-redis-${i}.${SVC}"
  [ "$PEER" = "$ME" ] && continue
  ANSWER=$(timeout 3 redis-cli -h "$PEER" -p 26379 --raw SENTINEL get-master-addr-by-name kvgate 2>/dev/null | head -n 1 || true)
  case "$ANSWER" in
    ""|*ERR*|*rror*) ;;
    *) PRIMARY="$ANSWER"; break ;;
  esac
done
[ -n "$PRIMARY" ] || PRIMARY="kvgate-redis-0.${SVC}"
echo "redis: I am ${ME}; primary is ${PRIMARY}"
cat > /conf/redis.conf <<EOF
port 6379
bind * -::*
protected-mode no
dir /data
appendonly yes
appendfsync everysec
requirepass ${REDIS_PASSWORD}
masterauth ${REDIS_PASSWORD}
replica-announce-ip ${ME}
# kvgate state must never be evicted silently (reservations, pins, histories).
maxmemory-policy noeviction
# A primary cut off from both replicas stops taking writes after 10 s, which bounds what a
# Sentinel failover can lose to that window.
min-replicas-to-write 1
min-replicas-max-lag 10
EOF
if [ "$PRIMARY" != "$ME" ]; then
  echo "replicaof ${PRIMARY} 6379" >> /conf/redis.conf
fi
cat > /conf/sentinel.conf <<EOF
port 26379
dir /tmp
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip ${ME}
sentinel monitor kvgate ${PRIMARY} 6379 2
sentinel auth-pass kvgate ${REDIS_PASSWORD}
sentinel down-after-milliseconds kvgate 5000
sentinel failover-timeout kvgate 30000
sentinel parallel-syncs kvgate 1
EOF