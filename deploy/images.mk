# Container images for kvgate — included by the top-level Makefile (paths are
# relative to the repository root). See deploy/README.md.
#
#   make images       app image + Redis/Mosquitto images (public ones with a registry,
#                     debootstrapped local ones without) and deploy/.build/images.env
#   make base-image   only the offline debootstrap base kvgate/base:bookworm
#   make wheelhouse   only deploy/.build/wheelhouse (kvgate + runtime deps as wheels)
#
# Knobs (environment or make variables): KVGATE_OFFLINE=1|0, KVGATE_REBUILD_BASE=1,
# KVGATE_APP_IMAGE, KVGATE_DEBIAN_MIRROR.

VENV ?= .venv
BUILD_IMAGES := deploy/build-images.sh

.PHONY: images base-image wheelhouse

# The wheelhouse is built with $(VENV)/bin/pip; the `venv` target (top-level
# Makefile) creates it. Order-only, so an up-to-date venv does not force anything.
images: | venv ## build the container images (see deploy/README.md)
	VENV=$(VENV) bash $(BUILD_IMAGES) all

base-image: ## build only the offline debootstrap base image kvgate/base:bookworm
	VENV=$(VENV) bash $(BUILD_IMAGES) base

wheelhouse: | venv ## build only deploy/.build/wheelhouse (kvgate + runtime wheels)
	VENV=$(VENV) bash $(BUILD_IMAGES) wheelhouse
