package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// The fault suite (-mode faults) measures, from outside, the promises of
// issue 8 under stress: it builds ./cmd/keypoold, runs it as a separate
// process on loopback (SQLite in a temporary directory, configured by
// environment, a YAML file and the admin API, as an operator would) in
// front of a stand-in upstream served by this process, drives it with
// concurrent clients, and checks each scenario's figures against the
// issue's bounds. Every request carries its own X-Request-Id, which
// keypoold forwards upstream and stores in its usage record, so the
// upstream's counts and the usage_records table (read from the SQLite
// file) can be compared request by request.
//
//	storm    a 429 storm: 20 keys, each allowing its own number of
//	         requests per 1 s window in the upstream (3 to 27, 300 req/s
//	         in all; 429 when over it, with the window's end announced in
//	         turn as Retry-After seconds, Retry-After HTTP-date,
//	         retry-after-ms and x-ratelimit-reset-requests), 64 clients
//	         offering 70% of that: 0 client-visible failures, 0 requests
//	         to a key before the time its 429 announced, upstream attempts
//	         <= 1.2 x requests
//	deadkey  one key of 10 always 500: its traffic <= breaker threshold +
//	         half-open probes per open period, 0 client-visible failures
//	outage   every key 503 for -outage, then healthy: p99 <= 1 s during
//	         the outage, attempts <= 1.2 x requests, >= 99% success
//	         within 2 x the breaker's open time after recovery
//	kill     kill -9 x -kills under load, restarting keypoold each time:
//	         usage records = requests the upstream answered with a 2xx,
//	         0 duplicates
//	sigterm  SIGTERM under load: 0 in-flight requests dropped, exit 0,
//	         every served request has its usage record
//	sse      -disconnects clients hang up mid-SSE: goroutines (the
//	         go_goroutines metric) and file descriptors (/proc/PID/fd) of
//	         keypoold back to baseline, no key penalised (admin API), a
//	         usage record with status 499 for each
//
// Full size (about five minutes on 2 cores):
//
//	go run ./bench -mode faults
//	go run ./bench -mode faults -scenarios storm,kill -json
//
// CI size (the same bounds on a fraction of the load, about 70 s):
// go test ./bench -run TestFaultsSmall, or go run ./bench -mode faults
// -small. The exit status is 1 when a bound fails.
// faultConfig sizes the suite.
type faultConfig struct {
	bin      string // keypoold binary
	dir      string // scratch directory: one subdirectory per scenario
	logLevel string
	clients  int
	// track, when set, is told of every keypoold and upstream a scenario
	// starts (tests stop them all in t.Cleanup, whatever happens).
	track func(stop func())

	stormRequests int
	stormKeys     int
	stormMean     int           // mean requests per window a key allows
	stormWindow   time.Duration // the upstream's rate window
	stormLoad     float64       // offered load, share of total capacity

	deadRequests int
	deadKeys     int
	deadRate     float64

	outage     time.Duration
	outageRate float64
	outageHold time.Duration // success held this long counts as recovered

	breakerThreshold int
	breakerProbes    int
	breakerOpen      time.Duration

	kills     int
	killEvery time.Duration // mean time between kills
	killRate  float64

	termAfter time.Duration // SIGTERM this long after the load starts
	termDelay time.Duration // upstream answer time, so requests are in flight
	termDrain time.Duration // keypoold's KEYPOOL_DRAIN_TIMEOUT

	disconnects   int
	sseConcurrent int
	fdSlack       int
	goSlack       int
}

// fullConfig is the size.
func fullConfig() faultConfig {
	return faultConfig{
		logLevel: "info", clients: 64,
		stormRequests: 10000, stormKeys: 20, stormMean: 15, stormWindow: time.Second, stormLoad: 0.7,
		deadRequests: 13000, deadKeys: 10, deadRate: 200,
		outage: 30 * time.Second, outageRate: 100, outageHold: 5 * time.Second,
		breakerThreshold: 5, breakerProbes: 3, breakerOpen: 30 * time.Second,
		kills: 20, killEvery: 1500 * time.Millisecond, killRate: 300,
		termAfter: 3 * time.Second, termDelay: 300 * time.Millisecond, termDrain: 10 * time.Second,
		disconnects: 1000, sseConcurrent: 100, fdSlack: 5, goSlack: 10,
	}
}

// smallConfig is the CI size: same bounds, a few thousand requests.
func smallConfig() faultConfig {
	c := fullConfig()
	c.stormRequests = 1500
	c.deadRequests = 1000
	c.outage, c.outageRate, c.outageHold = 3*time.Second, 100, 2*time.Second
	c.kills, c.killEvery, c.killRate = 3, time.Second, 150
	c.termAfter = 1500 * time.Millisecond
	c.disconnects, c.sseConcurrent = 200, 50
	return c
}

// scenario is one named test of the suite.
type scenario struct {
	name string
	run  func(ctx context.Context, fc faultConfig, r *report) error
}

// scenarios lists the suite in the order it runs.
var scenarios = []scenario{
	{"storm", runStorm},
	{"deadkey", runDeadKey},
	{"outage", runOutage},
	{"kill", runKill},
	{"sigterm", runSigterm},
	{"sse", runSSE},
}

// runScenario runs one scenario in its own scratch directory and returns
// its report.
func runScenario(ctx context.Context, fc faultConfig, s scenario) *report {
	r := &report{Scenario: s.name}
	fc.dir = filepath.Join(fc.dir, s.name)
	start := time.Now()
	if err := os.MkdirAll(fc.dir, 0o700); err != nil {
		r.Error = err.Error()
		return r
	}
	load0 := loadAvg()
	if err := s.run(ctx, fc, r); err != nil {
		r.Error = err.Error()
	}
	r.Seconds = time.Since(start).Seconds()
	r.info("machine load average (1 min) before", load0, "")
	r.info("machine load average (1 min) after", loadAvg(), "")
	return r
}

// loadAvg is the machine's 1-minute load average (0 when unknown): the
// figures of a busy, shared machine are noisier.
func loadAvg() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0
	}
	var l float64
	_, _ = fmt.Sscan(string(b), &l)
	return l
}

// selectScenarios returns the scenarios named in list ("all" or empty:
// every one).
func selectScenarios(list string) ([]scenario, error) {
	if list == "" || list == "all" {
		return scenarios, nil
	}
	var out []scenario
	for _, name := range strings.Split(list, ",") {
		name = strings.TrimSpace(name)
		found := false
		for _, s := range scenarios {
			if s.name == name {
				out, found = append(out, s), true
			}
		}
		if !found {
			var names []string
			for _, s := range scenarios {
				names = append(names, s.name)
			}
			return nil, fmt.Errorf("unknown scenario %q: want %s", name, strings.Join(names, ","))
		}
	}
	return out, nil
}

// faultsArgs reports whether args select -mode faults, and returns the
// other arguments, which are the suite's flags.
func faultsArgs(args []string) ([]string, bool) { return modeArgs(args, "faults") }

// modeArgs reports whether args select -mode name and returns them
// without it.
func modeArgs(args []string, name string) ([]string, bool) {
	for i := 0; i < len(args); i++ {
		a := strings.TrimLeft(args[i], "-")
		if a == "mode="+name && strings.HasPrefix(args[i], "-") {
			return append(append([]string(nil), args[:i]...), args[i+1:]...), true
		}
		if a == "mode" && strings.HasPrefix(args[i], "-") && i+1 < len(args) && args[i+1] == name {
			return append(append([]string(nil), args[:i]...), args[i+2:]...), true
		}
	}
	return nil, false
}

// faultsMain is -mode faults: it parses the suite's flags from args, runs
// the scenarios and returns the exit code (1 when a bound failed).
func faultsMain(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("faults", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: go run ./bench -mode faults [flags]\n\nRuns the fault suite of issue 8 against keypoold as a separate process (see bench/faults.go).\n\nFlags:")
		fs.PrintDefaults()
	}
	var (
		small       = fs.Bool("small", false, "CI size: the same bounds on a fraction of the load (as TestFaultsSmall)")
		list        = fs.String("scenarios", "all", "comma-separated scenarios: storm,deadkey,outage,kill,sigterm,sse")
		bin         = fs.String("keypoold", "", "keypoold binary to test (default: go build ./cmd/keypoold)")
		asJSON      = fs.Bool("json", false, "print the reports as JSON after the tables")
		logLevel    = fs.String("log-level", "", "keypoold's log level (its logs stay in the scratch directory)")
		keep        = fs.Bool("keep", false, "keep the scratch directory (logs, SQLite files)")
		clients     = fs.Int("clients", 0, "concurrent clients (default 64)")
		requests    = fs.Int("requests", 0, "storm: requests (default 10000, -small 1500)")
		kills       = fs.Int("kills", 0, "kill: kill -9 count (default 20, -small 3)")
		outage      = fs.Duration("outage", 0, "outage: how long every key answers 503 (default 30s, -small 3s)")
		disconnects = fs.Int("disconnects", 0, "sse: client disconnects mid-stream (default 1000, -small 200)")
		breakerOpen = fs.Duration("breaker-open", 0, "the breaker's open time keypoold uses (default 30s), for the bounds")
		timeout     = fs.Duration("timeout", 30*time.Minute, "bound on the whole run")
	)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	fc := fullConfig()
	if *small {
		fc = smallConfig()
	}
	setIf := func(dst *int, v int) {
		if v > 0 {
			*dst = v
		}
	}
	setIf(&fc.clients, *clients)
	setIf(&fc.stormRequests, *requests)
	setIf(&fc.kills, *kills)
	setIf(&fc.disconnects, *disconnects)
	if *outage > 0 {
		fc.outage = *outage
	}
	if *breakerOpen > 0 {
		fc.breakerOpen = *breakerOpen
	}
	if *logLevel != "" {
		fc.logLevel = *logLevel
	}
	sel, err := selectScenarios(*list)
	if err != nil {
		fmt.Fprintln(stderr, "bench:", err)
		return 2
	}
	dir, cleanup, err := scratchDir("keypool-faults-", *keep, stdout)
	if err != nil {
		fmt.Fprintln(stderr, "bench:", err)
		return 1
	}
	defer cleanup()
	fc.dir = dir
	fc.bin = *bin
	if fc.bin == "" {
		fmt.Fprintln(stdout, "building ./cmd/keypoold …")
		if fc.bin, err = buildKeypoold(ctx, dir); err != nil {
			fmt.Fprintln(stderr, "bench:", err)
			return 1
		}
	}
	fmt.Fprintf(stdout, "keypool fault suite: %d CPUs, %d clients, keypoold %s, log level %s\n\n", numCPU(), fc.clients, fc.bin, fc.logLevel)
	var reports []*report
	failed := false
	for _, s := range sel {
		if ctx.Err() != nil {
			break
		}
		r := runScenario(ctx, fc, s)
		r.write(stdout)
		reports = append(reports, r)
		failed = failed || !r.Passed()
	}
	fmt.Fprintln(stdout, "summary:")
	for _, r := range reports {
		res := "PASS"
		if !r.Passed() {
			res = "FAIL: " + strings.Join(r.Failed(), "; ")
		}
		fmt.Fprintf(stdout, "  %-8s %s\n", r.Scenario, res)
	}
	if *asJSON {
		_ = writeJSON(stdout, reports)
	}
	if failed {
		return 1
	}
	return 0
}

// scratchDir makes a scratch directory for a suite's processes. With keep
// it is named on stdout and left for inspection; otherwise cleanup
// removes it.
func scratchDir(prefix string, keep bool, stdout io.Writer) (dir string, cleanup func(), err error) {
	if dir, err = os.MkdirTemp("", prefix); err != nil {
		return "", nil, err
	}
	if keep {
		fmt.Fprintf(stdout, "scratch directory: %s\n", dir)
		return dir, func() {}, nil
	}
	return dir, func() { os.RemoveAll(dir) }, nil
}
