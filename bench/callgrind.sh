#!/bin/sh
# callgrind.sh counts the user-space instructions one request costs
# through keypoold's handler, direct (/v1/{service}, metered) and through
# a router to the same service, with valgrind's callgrind on
# BenchmarkProxyRequest (server/bench_test.go: in-process upstream, no
# network, nothing on a clock). Each case runs N and M requests;
# (instructions(N) - instructions(M)) / (N - M) cancels the set-up
# (server start, SQLite) and leaves a request's cost, its usage record's
# share of the batched writes included. It prints each run's figures and
# the medians over R runs.
#
#	sh bench/callgrind.sh                # GOGC=off, N=1600 M=100 R=3
#	GOGC=100 R=5 sh bench/callgrind.sh   # with the garbage collector
#
# GOGC=off (the default here) leaves the code path alone: with the
# collector on, its share depends on when cycles fall and varies by a
# few percent from run to run (take more runs). Go under valgrind needs
# GODEBUG=asyncpreemptoff=1 (no preemption signals) and cpu.rdtscp=off.
# Needs valgrind; CI and go test do not run it.
set -eu
N=${N:-1600}
M=${M:-100}
R=${R:-3}
export GOGC=${GOGC:-off}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
go test -c -o "$out/server.test" ./server
count() { # case requests -> instructions
	GODEBUG=asyncpreemptoff=1,cpu.rdtscp=off GOMAXPROCS=1 valgrind --tool=callgrind \
		--callgrind-out-file="$out/cg" "$out/server.test" -test.run '^$' \
		-test.bench "BenchmarkProxyRequest/$1\$" -test.benchtime "${2}x" -test.cpu 1 >/dev/null 2>&1
	sed -n 's/^summary: *//p' "$out/cg"
}
for run in $(seq 1 "$R"); do
	for c in meter=on router; do
		a=$(count "$c" "$N")
		b=$(count "$c" "$M")
		echo "$run $c $(((a - b) / (N - M)))"
	done
done | awk -v gogc="$GOGC" '
	{ print "run " $1 ": " $2 " " $3 " instructions per request"; v[$2, ++n[$2]] = $3 }
	function median(c,   i, j, t, k) {
		k = n[c]
		for (i = 1; i <= k; i++) a[i] = v[c, i]
		for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
		return k % 2 ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
	}
	END {
		d = median("meter=on"); r = median("router")
		printf "GOGC=%s medians: direct %d, router %d: the router adds %d instructions per request (%+.1f%%)\n", gogc, d, r, r - d, (r / d - 1) * 100
	}'
