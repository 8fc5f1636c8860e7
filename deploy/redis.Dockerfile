# kvgate/redis:local — offline stand-in for redis:7-bookworm, built on the
# debootstrap base kvgate/base:bookworm, which already contains Debian's
# redis-server + redis-tools and a redis-owned /data (made by build-images.sh so
# that this build is COPY-only: no RUN steps).
#   docker build -f deploy/redis.Dockerfile --build-arg BASE_IMAGE=kvgate/base:bookworm deploy
# Like the public image: port 6379, WORKDIR/VOLUME /data, CMD redis-server,
# listens on all interfaces with protected-mode off (see redis/rootfs/etc/redis/kvgate.conf).
ARG BASE_IMAGE=kvgate/base:bookworm
FROM ${BASE_IMAGE}

COPY redis/rootfs/ /

WORKDIR /data
VOLUME /data
USER redis
EXPOSE 6379
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["redis-server"]
