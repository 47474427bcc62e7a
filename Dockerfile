# syntax=docker/dockerfile:1
#
# keypoold container image.
#
#   docker build -t keypool/keypoold:local \
#     --build-arg VERSION=$(git describe --tags --always) \
#     --build-arg COMMIT=$(git rev-parse HEAD) .
#
# The build stage compiles keypoold with cgo SQLite linked statically
# (deploy/build.sh, the same script the deploy tests run). The final stage
# is distroless static: CA certificates, time zones, /etc/passwd with the
# nonroot user (65532), no shell, no package manager. /data, owned by
# nonroot, is the only path keypoold writes: the SQLite database and
# generated secrets. The root filesystem may be mounted read-only.

ARG GO_VERSION=1.26

FROM golang:${GO_VERSION}-bookworm AS build
WORKDIR /src
# Dependencies first: this layer is cached until go.mod or go.sum change.
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY . .
ARG VERSION=dev
ARG COMMIT=unknown
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
	VERSION="${VERSION}" COMMIT="${COMMIT}" sh deploy/build.sh /out/keypoold
RUN mkdir -p /out/data && chown 65532:65532 /out/data && chmod 0700 /out/data

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/keypoold /keypoold
COPY --from=build --chown=65532:65532 /out/data /data
USER 65532:65532
WORKDIR /data
# Listen on all interfaces inside the container; SQLite, its temporary
# files (TMPDIR) and generated secrets under /data, so that the root
# filesystem can be read-only. Set KEYPOOL_DATABASE=postgres://… for
# replicas.
ENV KEYPOOL_LISTEN=:8080 \
	KEYPOOL_DATABASE=sqlite:/data/keypool.db \
	KEYPOOL_DATA_DIR=/data \
	TMPDIR=/data
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
	CMD ["/keypoold", "healthcheck"]
ENTRYPOINT ["/keypoold"]
CMD ["serve"]
