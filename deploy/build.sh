#!/bin/sh
# build.sh builds keypoold as the container image ships it: cgo SQLite
# linked statically, -trimpath, the version and commit stamped in. The
# Dockerfile's build stage and the deploy tests both run this script, so
# the tests check the binary the image carries.
#
#   deploy/build.sh OUTPUT            (run from anywhere inside the repo)
#
# VERSION and COMMIT, when set, are stamped in; otherwise they come from
# git when a .git is present, else "dev" and "unknown".
set -eu

out="${1:?usage: deploy/build.sh OUTPUT}"
case "$out" in
/*) ;;
*) out="$(pwd)/$out" ;;
esac
cd "$(dirname "$0")/.."

version="${VERSION:-}"
commit="${COMMIT:-}"
if [ -z "$version" ]; then
	version="$(git describe --tags --always --dirty 2>/dev/null || echo dev)"
fi
if [ -z "$commit" ]; then
	commit="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
fi

# netgo and osusergo keep the resolver and user lookups in Go, so the
# static glibc link needs no NSS modules; sqlite_omit_load_extension drops
# SQLite's dlopen. -buildvcs=false: the commit is stamped explicitly.
CGO_ENABLED=1 go build \
	-trimpath \
	-buildvcs=false \
	-tags 'netgo osusergo sqlite_omit_load_extension' \
	-ldflags "-s -w -linkmode external -extldflags '-static' -X main.version=${version} -X main.commit=${commit}" \
	-o "$out" \
	./cmd/keypoold
