package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// costConfig is -mode cost: keypoold's cost per request with a setting
// on and off (an A/B of environment variables), from a fixed number of
// requests rather than a fixed time, so that figures compare per request.
type costConfig struct {
	requests int      // measured requests per target and run
	warmup   int      // requests per target before measuring
	conns    int      // concurrent connections
	runs     int      // runs of each variant, interleaved A B B A …
	env      []string // variant B's extra environment (KEY=VALUE)
	exeB     string   // variant B's bench binary ("": this one)
	settle   time.Duration
	targets  []string // keypoold, kp+meter
	// callgrind runs keypoold under valgrind's callgrind and counts the
	// instructions of each measured section (callgrind_control zeroes
	// and dumps the counters around it).
	callgrind bool
	dir       string // callgrind's output files
	// procs is keypoold's GOMAXPROCS (0: its default).
	procs    int
	gogc     string // keypoold's GOGC ("": its default)
	logLevel string
}

// costMain is -mode cost: it parses its flags from args, runs the A/B and
// prints per-request figures; it returns the exit code.
func costMain(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("cost", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, `usage: go run ./bench -mode cost [flags]

Measures keypoold's cost per proxied request with and without a setting:
variant A runs keypoold as the harness does, variant B with -env added to
its environment (default KEYPOOL_USAGE_JOURNAL=off). Each run starts a
fresh keypoold, warms it up, then sends exactly -requests requests per
target over -conns connections and reads keypoold's CPU time (user and
system, /proc/PID/stat) and write system calls (/proc/PID/io syscw)
before and after. Runs alternate A B B A … and medians are reported.
With -callgrind keypoold runs under valgrind --tool=callgrind and the
instructions (user space only: the kernel's share shows in the system
CPU and the write calls) of each measured section are counted too.

Flags:`)
		fs.PrintDefaults()
	}
	var (
		c       costConfig
		env     = fs.String("env", "KEYPOOL_USAGE_JOURNAL=off", "variant B's extra environment: comma-separated KEY=VALUE")
		targets = fs.String("targets", "keypoold,kp+meter", "targets: keypoold (service bench, unmetered), kp+meter (bench-llm, metered)")
	)
	fs.StringVar(&c.exeB, "exe-b", "", "variant B's bench binary, built from other code (go build -o … ./bench), to compare two builds")
	fs.DurationVar(&c.settle, "settle", -1, "idle time before and after each measured section, so that the usage writer's batches fall inside it (default 3s with -callgrind, else 1.5s)")
	fs.IntVar(&c.requests, "requests", 5000, "measured requests per target and run")
	fs.IntVar(&c.warmup, "warmup", 500, "requests per target before measuring")
	fs.IntVar(&c.conns, "conns", 64, "concurrent connections")
	fs.IntVar(&c.runs, "runs", 4, "runs of each variant (interleaved)")
	fs.BoolVar(&c.callgrind, "callgrind", false, "run keypoold under valgrind --tool=callgrind and count instructions")
	fs.IntVar(&c.procs, "gomaxprocs", -1, "keypoold's GOMAXPROCS (default: 1 with -callgrind, where valgrind runs one thread at a time anyway and idle Ps would spin for a count that depends on timing; else Go's default)")
	fs.StringVar(&c.gogc, "gogc", "", "keypoold's GOGC (e.g. off: no collection, so that instruction counts do not depend on when cycles fall; default Go's)")
	fs.StringVar(&c.dir, "out", "", "directory for callgrind's files (default: a temporary one, kept)")
	fs.StringVar(&c.logLevel, "log-level", "warn", "keypoold's log level")
	timeout := fs.Duration("timeout", time.Hour, "bound on the whole run")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	for _, kv := range strings.Split(*env, ",") {
		if kv = strings.TrimSpace(kv); kv != "" {
			if !strings.Contains(kv, "=") {
				fmt.Fprintf(stderr, "bench: bad -env %q: want KEY=VALUE\n", kv)
				return 2
			}
			c.env = append(c.env, kv)
		}
	}
	for _, t := range strings.Split(*targets, ",") {
		if t = strings.TrimSpace(t); t != "keypoold" && t != "kp+meter" {
			fmt.Fprintf(stderr, "bench: bad -targets %q\n", t)
			return 2
		}
		c.targets = append(c.targets, strings.TrimSpace(t))
	}
	if c.requests < 1 || c.conns < 1 || c.runs < 1 || c.warmup < 0 {
		fmt.Fprintln(stderr, "bench: -requests, -conns and -runs must be positive")
		return 2
	}
	if c.settle < 0 {
		c.settle = 1500 * time.Millisecond
		if c.callgrind {
			c.settle = 3 * time.Second
		}
	}
	if c.procs < 0 {
		c.procs = 0
		if c.callgrind {
			c.procs = 1
		}
	}
	if c.callgrind {
		var err error
		if c.dir == "" {
			c.dir, err = os.MkdirTemp("", "keypool-cost-")
		} else {
			err = os.MkdirAll(c.dir, 0o755)
		}
		if err != nil {
			fmt.Fprintln(stderr, "bench:", err)
			return 1
		}
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	if err := runCost(ctx, c, stdout); err != nil {
		fmt.Fprintln(stderr, "bench:", err)
		return 1
	}
	return 0
}

// costSample is one target's measured section in one run.
type costSample struct {
	user, sys time.Duration // CPU of keypoold per request
	writes    float64       // write system calls per request
	instr     float64       // instructions per request (callgrind)
	errs      int
}

func runCost(ctx context.Context, c costConfig, w io.Writer) error {
	up, err := startChild(ctx, "upstream", "", c.logLevel)
	if err != nil {
		return err
	}
	defer up.stop()
	upURL := "http://" + up.addr
	fmt.Fprintf(w, "keypool cost per request: %d CPUs; %d requests per target and run over %d connections (after %d warm-up); %d runs per variant, interleaved; A: as is, B: %s",
		numCPU(), c.requests, c.conns, c.warmup, c.runs, strings.Join(c.env, " "))
	if c.exeB != "" {
		fmt.Fprintf(w, " with %s", c.exeB)
	}
	fmt.Fprintf(w, "; %s idle around each section", c.settle)
	if c.procs > 0 {
		fmt.Fprintf(w, "; keypoold GOMAXPROCS=%d", c.procs)
	}
	if c.gogc != "" {
		fmt.Fprintf(w, "; keypoold GOGC=%s", c.gogc)
	}
	if c.callgrind {
		fmt.Fprintf(w, "; under callgrind (files in %s)", c.dir)
	}
	fmt.Fprintln(w)
	samples := map[string][]costSample{} // variant/target → runs
	for r := range c.runs {
		order := []string{"A", "B"}
		if r%2 == 1 {
			order = []string{"B", "A"}
		}
		for _, v := range order {
			var env []string
			exe := ""
			if v == "B" {
				env, exe = c.env, c.exeB
			}
			got, err := costRun(ctx, c, upURL, exe, env, fmt.Sprintf("%s%d", v, r))
			if err != nil {
				return fmt.Errorf("run %d, variant %s: %w", r, v, err)
			}
			for i, t := range c.targets {
				s := got[i]
				samples[v+"/"+t] = append(samples[v+"/"+t], s)
				fmt.Fprintf(w, "run %d %s %-9s user %8s sys %8s cpu %8s writes %.3f", r, v, t, s.user.Round(100*time.Nanosecond),
					s.sys.Round(100*time.Nanosecond), (s.user + s.sys).Round(100*time.Nanosecond), s.writes)
				if c.callgrind {
					fmt.Fprintf(w, " instr %.0f", s.instr)
				}
				fmt.Fprintf(w, " errors %d\n", s.errs)
			}
		}
	}
	fmt.Fprintf(w, "\nmedians per request (B vs A: (B-A)/A)\n")
	for _, t := range c.targets {
		a, b := samples["A/"+t], samples["B/"+t]
		med := func(ss []costSample, f func(costSample) float64) float64 {
			xs := make([]float64, len(ss))
			for i, s := range ss {
				xs[i] = f(s)
			}
			return median(xs)
		}
		for _, m := range []struct {
			name string
			f    func(costSample) float64
		}{
			{"cpu µs", func(s costSample) float64 { return float64(s.user+s.sys) / 1e3 }},
			{"user µs", func(s costSample) float64 { return float64(s.user) / 1e3 }},
			{"sys µs", func(s costSample) float64 { return float64(s.sys) / 1e3 }},
			{"writes", func(s costSample) float64 { return s.writes }},
			{"instr", func(s costSample) float64 { return s.instr }},
		} {
			if m.name == "instr" && !c.callgrind {
				continue
			}
			ma, mb := med(a, m.f), med(b, m.f)
			fmt.Fprintf(w, "%-9s %-8s A %12.3f  B %12.3f  (B-A)/A %+7.2f%%\n", t, m.name, ma, mb, 100*(mb-ma)/ma)
		}
	}
	return nil
}

// costRun starts keypoold with env added (under callgrind if asked),
// warms it up and measures each target in turn.
func costRun(ctx context.Context, c costConfig, upURL, exe string, env []string, name string) ([]costSample, error) {
	var wrap []string
	env = append([]string(nil), env...)
	if c.procs > 0 {
		env = append(env, "GOMAXPROCS="+strconv.Itoa(c.procs))
	}
	if c.gogc != "" {
		env = append(env, "GOGC="+c.gogc)
	}
	if c.callgrind {
		env = append(env, "GODEBUG=asyncpreemptoff=1,cpu.rdtscp=off")
		wrap = []string{"valgrind", "--tool=callgrind", "--instr-atstart=no",
			"--callgrind-out-file=" + filepath.Join(c.dir, name+".out")}
	}
	kp, err := startChildWith(ctx, exe, wrap, env, "keypoold", upURL, c.logLevel)
	if err != nil {
		return nil, err
	}
	defer kp.stop()
	pid := kp.cmd.Process.Pid
	client := newClient(c.conns)
	defer client.CloseIdleConnections()
	ts := map[string]target{
		"keypoold": {name: "keypoold", url: "http://" + kp.addr + "/v1/bench/v1/chat/completions", token: kp.token},
		"kp+meter": {name: "kp+meter", url: "http://" + kp.addr + "/v1/bench-llm/v1/chat/completions", token: kp.token},
	}
	for _, t := range c.targets {
		if errs := drive(ctx, client, ts[t], c.warmup, c.conns); errs > c.warmup/10 {
			return nil, fmt.Errorf("warm-up of %s: %d errors", t, errs)
		}
	}
	if c.callgrind {
		if err := callgrindControl(ctx, pid, "-i", "on"); err != nil {
			return nil, err
		}
	}
	out := make([]costSample, len(c.targets))
	for i, t := range c.targets {
		if err := sleepCtx(ctx, c.settle); err != nil {
			return nil, err
		}
		if c.callgrind {
			if err := callgrindControl(ctx, pid, "-z"); err != nil {
				return nil, err
			}
		}
		u0, s0 := procCPU(pid)
		w0 := procWrites(pid)
		errs := drive(ctx, client, ts[t], c.requests, c.conns)
		if err := sleepCtx(ctx, c.settle); err != nil {
			return nil, err
		}
		u1, s1 := procCPU(pid)
		w1 := procWrites(pid)
		n := time.Duration(c.requests)
		out[i] = costSample{user: (u1 - u0) / n, sys: (s1 - s0) / n, writes: float64(w1-w0) / float64(c.requests), errs: errs}
		if c.callgrind {
			if err := callgrindControl(ctx, pid, "-d"); err != nil {
				return nil, err
			}
			ins, err := lastDumpTotal(filepath.Join(c.dir, name+".out"))
			if err != nil {
				return nil, err
			}
			out[i].instr = float64(ins) / float64(c.requests)
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
	}
	return out, nil
}

// drive sends n requests to t over conns connections and returns how many
// failed.
func drive(ctx context.Context, client *http.Client, t target, n, conns int) int {
	var next, errs atomic.Int64
	var wg sync.WaitGroup
	for range conns {
		wg.Go(func() {
			for next.Add(1) <= int64(n) && ctx.Err() == nil {
				if doChat(ctx, client, t) != nil {
					errs.Add(1)
				}
			}
		})
	}
	wg.Wait()
	return int(errs.Load())
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

func callgrindControl(ctx context.Context, pid int, args ...string) error {
	cmd := exec.CommandContext(ctx, "callgrind_control", append(args, strconv.Itoa(pid))...)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("callgrind_control %s: %w: %s", strings.Join(args, " "), err, out)
	}
	return nil
}

// lastDumpTotal returns the instruction total of the newest of the dumps
// named base.N.
func lastDumpTotal(base string) (int64, error) {
	files, _ := filepath.Glob(base + ".*")
	last, lastN := "", -1
	for _, f := range files {
		if n, err := strconv.Atoi(strings.TrimPrefix(f, base+".")); err == nil && n > lastN {
			last, lastN = f, n
		}
	}
	if last == "" {
		return 0, fmt.Errorf("no callgrind dump %s.N", base)
	}
	// The dump is written when callgrind_control returns.
	f, err := os.Open(last)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "summary:"); ok {
			return strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		}
	}
	return 0, fmt.Errorf("%s: no summary line", last)
}

// procCPU returns a process's user and system CPU time (/proc/PID/stat).
func procCPU(pid int) (user, sys time.Duration) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0
	}
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 {
		s = s[i+2:]
	}
	f := strings.Fields(s)
	if len(f) < 13 {
		return 0, 0
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut) * time.Second / 100, time.Duration(st) * time.Second / 100 // USER_HZ is 100 on Linux
}

// procWrites returns a process's write system calls so far (/proc/PID/io
// syscw: files and sockets alike).
func procWrites(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/io", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "syscw:"); ok {
			n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			return n
		}
	}
	return 0
}
