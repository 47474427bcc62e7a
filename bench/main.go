// Command bench is keypool's load harness. It starts, as separate
// processes on loopback, a local upstream (a fast JSON answer and a
// 100 ms SSE stream), a bare httputil.ReverseProxy in front of it, and
// keypoold (server.New on a temporary SQLite database with one service,
// four keys, a team and a token), then drives each with the same load and
// prints throughput, latency percentiles, CPU per request and peak RSS,
// with keypoold/bare ratios. The streams mode first opens 50 SSE streams
// one at a time through each proxy and prints the time to first event
// keypoold adds; it then opens -streams concurrent
// SSE streams at once, -waves times, through each proxy in turn, and
// prints the wall time of the waves, the time to first event (p50, p99),
// peak RSS, and keypoold's wall and RSS ratios and added time to first
// event against the bare proxy.
//
//	go run ./bench                          # throughput at 1 and 64 connections, then 512 streams
//	go run ./bench -mode throughput -conns 1,16,64 -duration 5s -rounds 5
//	go run ./bench -mode streams -streams 512
//	go run ./bench -mode throughput -meter   # also keypoold with LLM metering and budgets on
//	go run ./bench -mode throughput -router  # also the same call through a router (kind router), vs direct
//	go run ./bench -mode faults              # the fault suite (see faults.go), with its own flags
//	go run ./bench -mode replicas            # the replica suite (see replicas.go), with its own flags
//	go run ./bench -mode cost                # keypoold's CPU per request with the usage journal on and off (see cost.go)
//	go run ./bench -mode cost -callgrind     # … and its instructions per request, counted by callgrind
//
// keypoold serves two services on the same upstream: "bench" with
// llm_family none (metering off) and "bench-llm" with llm_family openai
// (usage read from each answer, priced, a team daily token budget and a
// service cost budget reserved and settled, usage records written). With
// -meter the throughput mode measures both in the same rounds and prints
// the metered/unmetered ratio. With -router it also measures the metered
// call through "bench-router", a router whose one route sends
// gpt-4o-mini to bench-llm, and prints the router's added CPU per request
// over the direct /v1/bench-llm call (-router implies -meter).
//
// Rounds alternate the order of the two proxies and the figures reported
// are medians over rounds, so that a noisy, shared machine skews both
// alike. Everything listens on 127.0.0.1 and the whole run is bounded by
// -timeout.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/auth"
	"github.com/keypool/keypool/server"
	"github.com/keypool/keypool/store"
)

func main() {
	if args, ok := faultsArgs(os.Args[1:]); ok {
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		code := faultsMain(ctx, args, os.Stdout, os.Stderr)
		stop()
		os.Exit(code)
	}
	if args, ok := modeArgs(os.Args[1:], "cost"); ok {
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		code := costMain(ctx, args, os.Stdout, os.Stderr)
		stop()
		os.Exit(code)
	}
	if args, ok := modeArgs(os.Args[1:], "replicas"); ok {
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		code := replicasMain(ctx, args, os.Stdout, os.Stderr)
		stop()
		os.Exit(code)
	}
	var (
		role      = flag.String("role", "", "internal: run as upstream, bare or keypoold")
		target    = flag.String("upstream", "", "internal: upstream URL for the bare proxy and keypoold")
		mode      = flag.String("mode", "all", "throughput, streams, all, faults, replicas or cost (the fault, replica and cost modes have their own flags: -mode faults -h)")
		connsFlag = flag.String("conns", "1,64", "comma-separated connection counts for the throughput mode")
		duration  = flag.Duration("duration", 4*time.Second, "load duration per measurement")
		rounds    = flag.Int("rounds", 3, "measurements per proxy and connection count (medians are reported)")
		streams   = flag.Int("streams", 512, "concurrent SSE streams in the streams mode")
		waves     = flag.Int("waves", 3, "waves of concurrent streams")
		logLevel  = flag.String("log-level", "info", "keypoold's log level (its logs go to a file, as in production)")
		timeout   = flag.Duration("timeout", 10*time.Minute, "bound on the whole run")
		meterFlag = flag.Bool("meter", false, "throughput mode: also measure keypoold with LLM metering and budgets on")
		routeFlag = flag.Bool("router", false, "throughput mode: also measure the metered call through a router (implies -meter)")
	)
	flag.Parse()
	if *role != "" {
		if err := runRole(*role, *target, *logLevel); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(1)
		}
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	if !validMode(*mode) {
		fmt.Fprintf(os.Stderr, "bench: bad -mode %q: want %s\n", *mode, strings.Join(modes, ", "))
		os.Exit(2)
	}
	var conns []int
	for _, s := range strings.Split(*connsFlag, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 1 {
			fmt.Fprintln(os.Stderr, "bench: bad -conns")
			os.Exit(2)
		}
		conns = append(conns, n)
	}
	if err := harness(ctx, *mode, conns, *duration, *rounds, *streams, *waves, *logLevel, *meterFlag || *routeFlag, *routeFlag); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// ---- child processes ----

// chatBody is the upstream's fast answer: a small OpenAI chat completion.
const chatBody = `{"id":"chatcmpl-bench","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21}}`

// streamEvents and streamGap make a 100 ms SSE stream.
const (
	streamEvents = 5
	streamGap    = 20 * time.Millisecond
)

func upstreamHandler() http.Handler {
	chat := []byte(chatBody)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		if strings.HasSuffix(r.URL.Path, "/stream") {
			w.Header().Set("Content-Type", "text/event-stream")
			w.Header().Set("Cache-Control", "no-cache")
			fl := w.(http.Flusher)
			for i := range streamEvents {
				time.Sleep(streamGap)
				fmt.Fprintf(w, "data: {\"i\":%d,\"choices\":[{\"delta\":{\"content\":\"tok\"}}]}\n\n", i)
				fl.Flush()
			}
			_, _ = io.WriteString(w, "data: [DONE]\n\n")
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", strconv.Itoa(len(chat)))
		_, _ = w.Write(chat)
	})
}

// runRole runs one child process: it listens on a loopback port, prints
// "READY <addr> [token]" and serves until stdin closes or SIGTERM.
func runRole(role, target, logLevel string) error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() { _, _ = io.Copy(io.Discard, os.Stdin); stop() }() // parent gone: exit
	switch role {
	case "upstream", "bare":
		h := upstreamHandler()
		if role == "bare" {
			u, err := url.Parse(target)
			if err != nil {
				return err
			}
			h = &httputil.ReverseProxy{
				Rewrite:   func(pr *httputil.ProxyRequest) { pr.SetURL(u); pr.Out.Host = "" },
				Transport: server.DefaultUpstream(),
				ErrorLog:  nil,
			}
		}
		srv := &http.Server{Handler: h, ReadHeaderTimeout: 30 * time.Second}
		fmt.Printf("READY %s\n", ln.Addr())
		go func() { <-ctx.Done(); _ = srv.Close() }()
		if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	case "keypoold":
		if p := os.Getenv("BENCH_CPUPROFILE"); p != "" {
			f, err := os.Create(p)
			if err != nil {
				return err
			}
			_ = pprof.StartCPUProfile(f)
			defer pprof.StopCPUProfile()
		}
		if p := os.Getenv("BENCH_MEMPROFILE"); p != "" {
			defer func() {
				if f, err := os.Create(p); err == nil {
					_ = pprof.Lookup("allocs").WriteTo(f, 0)
					_ = f.Close()
				}
			}()
		}
		dir, err := os.MkdirTemp("", "keypool-bench-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		logf, err := os.Create(filepath.Join(dir, "keypoold.log"))
		if err != nil {
			return err
		}
		defer logf.Close()
		cfg := server.Config{
			Database:      server.SecretURL("sqlite:" + filepath.Join(dir, "keypool.db")),
			AdminToken:    "kpadm_bench_admin_token_not_secret_000",
			EncryptionKey: "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
			LogLevel:      logLevel,
			LogOutput:     logf,
			Output:        io.Discard,
			DrainTimeout:  server.Duration(2 * time.Second),
		}
		// KEYPOOL_* variables apply as they would to keypoold, so that a
		// setting can be compared on and off (KEYPOOL_USAGE_JOURNAL=off).
		if err := cfg.ApplyEnv(os.LookupEnv); err != nil {
			return err
		}
		s, err := server.New(ctx, cfg)
		if err != nil {
			return err
		}
		tok, err := seed(ctx, s, target)
		if err != nil {
			_ = s.Shutdown(context.Background())
			return err
		}
		fmt.Printf("READY %s %s\n", ln.Addr(), tok)
		return s.Serve(ctx, ln)
	}
	return fmt.Errorf("unknown role %q", role)
}

// seed creates service "bench" on the upstream with four keys, a team and
// a token, and returns the token.
func seed(ctx context.Context, s *server.Server, upstream string) (string, error) {
	st := s.Store()
	if err := st.CreateService(ctx, &store.Service{Name: "bench", BaseURL: upstream, AuthScheme: "bearer", LLMFamily: "none"}); err != nil {
		return "", err
	}
	if err := st.CreateService(ctx, &store.Service{Name: "bench-llm", BaseURL: upstream, AuthScheme: "bearer", LLMFamily: "openai",
		Limits: store.Limits{LimitCostDayWarn: 1e6, LimitCostDayBlock: 2e6}}); err != nil {
		return "", err
	}
	var keys []*store.Key
	for _, svc := range []string{"bench", "bench-llm"} {
		for i := range 4 {
			keys = append(keys, &store.Key{Service: svc, Secret: keypool.Secret("sk-" + svc + "-key-" + strconv.Itoa(i) + "-0123456789abcdef"),
				Status: store.StatusActive, BalanceTotal: 1e9, BalanceUnit: "usd"})
		}
	}
	if err := st.CreateKeys(ctx, keys); err != nil {
		return "", err
	}
	if err := st.CreateService(ctx, &store.Service{Name: "bench-router", Kind: store.KindRouter, AuthScheme: "bearer",
		Routes: []store.Route{{Model: "gpt-4o-mini", Targets: []store.Target{{Service: "bench-llm"}}}}}); err != nil {
		return "", err
	}
	team := &store.Team{Name: "bench", Limits: store.Limits{DailyTokenLimit: 1e12, TPMLimit: 1e12}}
	if err := st.CreateTeam(ctx, team); err != nil {
		return "", err
	}
	tok, prefix, hash, err := auth.NewToken()
	if err != nil {
		return "", err
	}
	if err := st.CreateToken(ctx, &store.Token{Name: "bench", TeamID: team.ID, Prefix: prefix, Hash: hash, IsActive: true}); err != nil {
		return "", err
	}
	return tok, s.Reload(ctx)
}

type child struct {
	name  string
	cmd   *exec.Cmd
	stdin io.WriteCloser
	addr  string
	token string
}

func startChild(ctx context.Context, role, upstream, logLevel string) (*child, error) {
	return startChildWith(ctx, "", nil, nil, role, upstream, logLevel)
}

// startChildWith starts a child process of role with env added to this
// process's environment, run by wrap (a command and its arguments, e.g.
// valgrind's) when it is not empty. exe is the bench binary to run (""
// for this one).
func startChildWith(ctx context.Context, exe string, wrap, env []string, role, upstream, logLevel string) (*child, error) {
	if exe == "" {
		var err error
		if exe, err = os.Executable(); err != nil {
			return nil, err
		}
	}
	args := append(append([]string(nil), wrap...), exe, "-role", role, "-upstream", upstream, "-log-level", logLevel)
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	if len(env) > 0 {
		cmd.Env = append(os.Environ(), env...)
	}
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		_ = cmd.Process.Kill()
		return nil, fmt.Errorf("%s did not start: %w", role, err)
	}
	f := strings.Fields(line)
	if len(f) < 2 || f[0] != "READY" {
		_ = cmd.Process.Kill()
		return nil, fmt.Errorf("%s: unexpected %q", role, line)
	}
	c := &child{name: role, cmd: cmd, stdin: stdin, addr: f[1]}
	if len(f) > 2 {
		c.token = f[2]
	}
	return c, nil
}

func (c *child) stop() {
	_ = c.stdin.Close()
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = c.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		_ = c.cmd.Process.Kill()
		<-done
	}
}

// cpuTime returns the process's user+system CPU time (from /proc).
func (c *child) cpuTime() time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", c.cmd.Process.Pid))
	if err != nil {
		return 0
	}
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 {
		s = s[i+2:]
	}
	f := strings.Fields(s)
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * time.Second / 100 // USER_HZ is 100 on Linux
}

// peakRSS returns the process's peak resident set size (VmHWM), bytes.
func (c *child) peakRSS() int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", c.cmd.Process.Pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmHWM:") {
			f := strings.Fields(l)
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb << 10
		}
	}
	return 0
}

// resetPeakRSS resets VmHWM to the current RSS.
func (c *child) resetPeakRSS() {
	_ = os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", c.cmd.Process.Pid), []byte("5"), 0)
}

// ---- load ----

type target struct {
	name  string
	url   string
	token string
	proc  *child
}

type result struct {
	reqs, errs int
	rps        float64
	p50, p99   time.Duration
	cpuPerReq  time.Duration
}

const reqBody = `{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}`

func newClient(conns int) *http.Client {
	return &http.Client{Transport: &http.Transport{
		MaxIdleConns: conns * 2, MaxIdleConnsPerHost: conns * 2, MaxConnsPerHost: conns,
		IdleConnTimeout: time.Minute, DisableCompression: true,
	}, Timeout: 30 * time.Second}
}

// load drives t with conns connections for d and measures it.
func load(ctx context.Context, t target, conns int, d time.Duration) result {
	client := newClient(conns)
	defer client.CloseIdleConnections()
	// Warm up: open the connections.
	var wg sync.WaitGroup
	for range conns {
		wg.Go(func() { _ = doChat(ctx, client, t) })
	}
	wg.Wait()
	lat := make([][]time.Duration, conns)
	var errs atomic.Int64
	cpu0 := time.Duration(0)
	if t.proc != nil {
		cpu0 = t.proc.cpuTime()
	}
	start := time.Now()
	deadline := start.Add(d)
	for i := range conns {
		wg.Go(func() {
			l := make([]time.Duration, 0, 1<<14)
			for time.Now().Before(deadline) && ctx.Err() == nil {
				t0 := time.Now()
				if err := doChat(ctx, client, t); err != nil {
					errs.Add(1)
					continue
				}
				l = append(l, time.Since(t0))
			}
			lat[i] = l
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	var all []time.Duration
	for _, l := range lat {
		all = append(all, l...)
	}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	r := result{reqs: len(all), errs: int(errs.Load())}
	r.rps = float64(r.reqs) / elapsed.Seconds()
	if len(all) > 0 {
		r.p50 = all[len(all)/2]
		r.p99 = all[min(len(all)-1, len(all)*99/100)]
	}
	if t.proc != nil && r.reqs > 0 {
		r.cpuPerReq = (t.proc.cpuTime() - cpu0) / time.Duration(r.reqs)
	}
	return r
}

func doChat(ctx context.Context, c *http.Client, t target) error {
	req, err := http.NewRequestWithContext(ctx, "POST", t.url, strings.NewReader(reqBody))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	if t.token != "" {
		req.Header.Set("Authorization", "Bearer "+t.token)
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	n, _ := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || n != int64(len(chatBody)) {
		return fmt.Errorf("status %d, %d bytes", resp.StatusCode, n)
	}
	return nil
}

func (t target) streamURL() string { return strings.TrimSuffix(t.url, "/chat/completions") + "/stream" }

// ---- report ----

func median[T int | float64 | time.Duration](xs []T) T {
	s := append([]T(nil), xs...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	if len(s) == 0 {
		var z T
		return z
	}
	return s[len(s)/2]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.3fms", float64(d)/1e6) }

func harness(ctx context.Context, mode string, conns []int, d time.Duration, rounds, nStreams, waves int, logLevel string, metered, routed bool) error {
	up, err := startChild(ctx, "upstream", "", logLevel)
	if err != nil {
		return err
	}
	defer up.stop()
	upURL := "http://" + up.addr
	bare, err := startChild(ctx, "bare", upURL, logLevel)
	if err != nil {
		return err
	}
	defer bare.stop()
	kp, err := startChild(ctx, "keypoold", upURL, logLevel)
	if err != nil {
		return err
	}
	defer kp.stop()

	direct := target{name: "direct", url: upURL + "/v1/chat/completions"}
	tBare := target{name: "bare", url: "http://" + bare.addr + "/v1/chat/completions", proc: bare}
	tKP := target{name: "keypoold", url: "http://" + kp.addr + "/v1/bench/v1/chat/completions", token: kp.token, proc: kp}
	tMeter := target{name: "kp+meter", url: "http://" + kp.addr + "/v1/bench-llm/v1/chat/completions", token: kp.token, proc: kp}
	tRouter := target{name: "kp+router", url: "http://" + kp.addr + "/v1/bench-router/v1/chat/completions", token: kp.token, proc: kp}

	fmt.Println(header(mode, numCPU(), conns, d, rounds, nStreams, waves, metered, logLevel))
	fmt.Printf("upstream %s, bare proxy %s, keypoold %s (1 service, 4 keys, team token)\n\n", up.addr, bare.addr, kp.addr)

	if mode == "all" || mode == "throughput" {
		bare.resetPeakRSS()
		kp.resetPeakRSS()
		for _, c := range conns {
			var rb, rk, rm, rr, rd []result
			for r := range rounds {
				order := []*[]result{&rb, &rk}
				ts := []target{tBare, tKP}
				if metered {
					order = append(order, &rm)
					ts = append(ts, tMeter)
				}
				if routed {
					order = append(order, &rr)
					ts = append(ts, tRouter)
				}
				if r%2 == 1 {
					// Reverse the order every other round.
					for i, j := 0, len(ts)-1; i < j; i, j = i+1, j-1 {
						order[i], order[j], ts[i], ts[j] = order[j], order[i], ts[j], ts[i]
					}
				}
				for i, t := range ts {
					*order[i] = append(*order[i], load(ctx, t, c, d))
				}
				if c == 1 {
					rd = append(rd, load(ctx, direct, c, d))
				}
				if ctx.Err() != nil {
					return ctx.Err()
				}
			}
			printConns(c, rb, rk, rm, rr, rd)
		}
		fmt.Printf("peak RSS over the throughput rounds: bare %.1f MiB, keypoold %.1f MiB, ratio keypoold/bare %.3f\n",
			float64(bare.peakRSS())/(1<<20), float64(kp.peakRSS())/(1<<20), float64(kp.peakRSS())/float64(max(bare.peakRSS(), 1)))
	}
	if mode == "all" || mode == "streams" {
		return streamsMode(ctx, tBare, tKP, bare, kp, nStreams, waves)
	}
	return nil
}

func numCPU() int {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return 0
	}
	return strings.Count(string(b), "processor\t:")
}
