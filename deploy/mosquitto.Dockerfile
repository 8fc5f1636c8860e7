# kvgate/mosquitto:local — offline stand-in for eclipse-mosquitto:2, built on the
# debootstrap base kvgate/base:bookworm, which already contains Debian's mosquitto
# + mosquitto-clients and a mosquitto-owned /mosquitto/{config,data,log} (made by
# build-images.sh so that this build is COPY-only: no RUN steps).
# Same config path, port and CMD as the public image; compose mounts deploy/mosquitto
# (config, ACL, start.sh) over the baked-in copy for either image.
#   docker build -f deploy/mosquitto.Dockerfile --build-arg BASE_IMAGE=kvgate/base:bookworm deploy
ARG BASE_IMAGE=kvgate/base:bookworm
FROM ${BASE_IMAGE}

COPY mosquitto/ /mosquitto/config/

VOLUME ["/mosquitto/data", "/mosquitto/log"]
USER mosquitto
EXPOSE 1883
# Without a config, like the public image's default: local-only listener. The kvgate
# configuration needs the password file that start.sh builds (compose runs start.sh).
CMD ["/usr/sbin/mosquitto"]
