# kvgate/mosquitto:local — offline stand-in for eclipse-mosquitto:2, built on the
# debootstrap base kvgate/base:bookworm, which already contains Debian's mosquitto
# + mosquitto-clients and a mosquitto-owned /mosquitto/{config,data,log} (made by
# build-images.sh so that this build is COPY-only: no RUN steps).
# Same config path, port and CMD as the public image, so compose can bind-mount
# deploy/mosquitto/mosquitto.conf over the baked-in copy for either image.
#   docker build -f deploy/mosquitto.Dockerfile --build-arg BASE_IMAGE=kvgate/base:bookworm deploy
ARG BASE_IMAGE=kvgate/base:bookworm
FROM ${BASE_IMAGE}

COPY mosquitto/mosquitto.conf /mosquitto/config/mosquitto.conf

VOLUME ["/mosquitto/data", "/mosquitto/log"]
USER mosquitto
EXPOSE 1883
CMD ["/usr/sbin/mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]
