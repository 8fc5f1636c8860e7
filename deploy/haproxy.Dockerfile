# kvgate/haproxy:local — offline stand-in for haproxy:2.8, built on the debootstrap base
# kvgate/base:bookworm, which already contains Debian's haproxy (2.6). COPY-only.
# Same config path, user and CMD as the public image, so compose can bind-mount
# deploy/haproxy/haproxy.cfg for either image.
#   docker build -f deploy/haproxy.Dockerfile --build-arg BASE_IMAGE=kvgate/base:bookworm deploy
ARG BASE_IMAGE=kvgate/base:bookworm
FROM ${BASE_IMAGE}

COPY haproxy/haproxy.cfg /usr/local/etc/haproxy/haproxy.cfg

USER haproxy
EXPOSE 50050 8080 8404
CMD ["haproxy", "-W", "-db", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]
