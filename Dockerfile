# The nbd-csi image: nbd-datapathd, nbd-csi-controller, nbd-csi-node and nbdctl on Debian 12,
# with what the node needs besides them: mkfs and online resize for ext4 and xfs, modprobe for
# nbd.ko, and nbdfuse + fusermount3 for kernels without nbd.ko.
#
#   docker build -t nbd-csi:0.1.0 --build-arg VERSION=0.1.0 --build-arg REVISION=$(git rev-parse HEAD) .
#
# Where no registry is reachable, scripts/build-image.sh makes the same image from Debian's
# packages (mmdebstrap + umoci). Both take the runtime package list (computed from the binaries'
# shared libraries) and the finishing steps from that script; test/image compares the two.
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS build
WORKDIR /src
COPY scripts/deps.sh scripts/
RUN ./scripts/deps.sh build \
 && apt-get install -y -q --no-install-recommends ccache \
 && rm -rf /var/lib/apt/lists/*
COPY . .
# The image needs no tests: configure once without them, then the README's build script (which
# only builds when the tree is configured). A compiler cache mounted at /ccache
# (podman build -v DIR:/ccache) is used when there is one.
RUN if [ -d /ccache ]; then \
      export CCACHE_DIR=/ccache CCACHE_BASEDIR=/src CCACHE_NOHASHDIR=1 CCACHE_COMPILERCHECK=content \
             CMAKE_C_COMPILER_LAUNCHER=ccache CMAKE_CXX_COMPILER_LAUNCHER=ccache; \
    fi \
 && cmake --preset default -DNBDCSI_BUILD_TESTS=OFF >/dev/null \
 && echo default > build/.preset \
 && ./scripts/build.sh default \
 && ./scripts/build-image.sh stage build/bin /stage

FROM ${BASE}
# test/image checks that this default is the project version.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=
ARG LICENSES=NOASSERTION
COPY --from=build /stage /tmp/stage
RUN apt-get update -q \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(cat /tmp/stage/packages) \
 && bash /tmp/stage/build-image.sh finish / /tmp/stage \
 && rm -rf /tmp/stage
LABEL org.opencontainers.image.title="nbd-csi" \
      org.opencontainers.image.description="nbd.csi.io CSI driver: nbd-datapathd, nbd-csi-controller, nbd-csi-node, nbdctl" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="${LICENSES}"
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Root by default: the node plugin and the datapath need it (the chart makes them privileged).
# The chart runs the controller pod as the image's nbd-csi user (uid 10001).
CMD ["nbdctl", "--help"]
