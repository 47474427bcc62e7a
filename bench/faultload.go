package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// outcome is what one client saw of one request.
type outcome struct {
	id      string
	start   time.Duration // since the load began
	latency time.Duration
	end     time.Time // when the whole answer was read
	status  int       // 0 when no answer arrived
	code    string    // the error code of a JSON error answer
	ok      bool      // 200 with the whole expected body
	refused bool      // the connection was refused: keypoold was not listening
	err     string    // transport error, if any
}

// loadSpec is a client load: requests requests (0: until stop) from
// clients concurrent clients, paced at rate requests per second in total
// (0: each client sends its next request as soon as the last one ends).
type loadSpec struct {
	prefix   string // request ids are prefix-N
	requests int
	clients  int
	rate     float64
	// poisson spaces paced requests at random (exponential gaps of mean
	// 1/rate), as independent clients would, instead of evenly.
	poisson bool
	// pause after a refused connection (keypoold restarting).
	pause time.Duration
	// onResult, when set, sees each outcome as it completes, from the
	// client's goroutine.
	onResult func(outcome)
}

// client is the load's HTTP client to keypoold.
func loadClient(conns int) *http.Client {
	return &http.Client{Transport: &http.Transport{
		MaxIdleConns: conns * 2, MaxIdleConnsPerHost: conns * 2,
		IdleConnTimeout: time.Minute, DisableCompression: true,
	}, Timeout: 60 * time.Second}
}

// runLoad sends the load through send until it is done, ctx ends or stop
// is closed, and returns every outcome in the order requests were issued.
func runLoad(ctx context.Context, spec loadSpec, stop <-chan struct{}, send func(ctx context.Context, id string) outcome) []outcome {
	var next atomic.Int64
	var tokens chan struct{}
	start := time.Now()
	done := make(chan struct{})
	if spec.rate > 0 {
		// Tokens are handed to a ready client at most every interval:
		// when no client is ready on time the schedule slips rather than
		// catching up later in a burst, so the offered rate never passes
		// spec.rate.
		tokens = make(chan struct{})
		go func() {
			defer close(tokens)
			interval := time.Duration(float64(time.Second) / spec.rate)
			due := start
			for i := 0; spec.requests == 0 || i < spec.requests; i++ {
				if d := time.Until(due); d > 0 {
					t := time.NewTimer(d)
					select {
					case <-t.C:
					case <-ctx.Done():
						t.Stop()
						return
					case <-stop:
						t.Stop()
						return
					case <-done:
						t.Stop()
						return
					}
				}
				select {
				case tokens <- struct{}{}:
				case <-ctx.Done():
					return
				case <-stop:
					return
				case <-done:
					return
				}
				gap := interval
				if spec.poisson {
					gap = time.Duration(rand.ExpFloat64() * float64(interval))
				}
				if due = due.Add(gap); due.Before(time.Now()) {
					due = time.Now()
				}
			}
		}()
	}
	var mu sync.Mutex
	var all []outcome
	var wg sync.WaitGroup
	for range spec.clients {
		wg.Go(func() {
			var mine []outcome
			for {
				if tokens != nil {
					if _, ok := <-tokens; !ok {
						break
					}
				}
				if stopped(ctx, stop) {
					break
				}
				n := next.Add(1)
				if spec.requests > 0 && n > int64(spec.requests) {
					break
				}
				id := fmt.Sprintf("%s-%d", spec.prefix, n)
				t0 := time.Now()
				o := send(ctx, id)
				o.end = time.Now()
				o.id, o.start, o.latency = id, t0.Sub(start), o.end.Sub(t0)
				mine = append(mine, o)
				if spec.onResult != nil {
					spec.onResult(o)
				}
				if o.refused && spec.pause > 0 {
					waitCtx(ctx, spec.pause)
				}
			}
			mu.Lock()
			all = append(all, mine...)
			mu.Unlock()
		})
	}
	wg.Wait()
	close(done)
	sort.Slice(all, func(i, j int) bool { return all[i].start < all[j].start })
	return all
}

// stopped reports whether ctx ended or stop was closed.
func stopped(ctx context.Context, stop <-chan struct{}) bool {
	select {
	case <-stop:
		return true
	case <-ctx.Done():
		return true
	default:
		return false
	}
}

// chatSender posts a chat completion to url with token and id, and
// checks the answer is the upstream's whole chat body.
func chatSender(c *http.Client, url, token string) func(ctx context.Context, id string) outcome {
	return func(ctx context.Context, id string) outcome {
		req, err := http.NewRequestWithContext(ctx, "POST", url, strings.NewReader(reqBody))
		if err != nil {
			return outcome{err: err.Error()}
		}
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Authorization", "Bearer "+token)
		req.Header.Set("X-Request-Id", id)
		resp, err := c.Do(req)
		if err != nil {
			return outcome{err: err.Error(), refused: errors.Is(err, syscall.ECONNREFUSED)}
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		o := outcome{status: resp.StatusCode}
		if err != nil {
			o.err = err.Error()
		}
		o.ok = resp.StatusCode == 200 && err == nil && string(b) == chatBody
		if resp.StatusCode != 200 {
			var e struct {
				Error struct {
					Code string `json:"code"`
				} `json:"error"`
			}
			if json.Unmarshal(b, &e) == nil {
				o.code = e.Error.Code
			}
		}
		return o
	}
}

// percentile returns the p-th percentile (0..100) of the outcomes'
// latencies.
func percentile(os []outcome, p float64) time.Duration {
	if len(os) == 0 {
		return 0
	}
	l := make([]time.Duration, len(os))
	for i, o := range os {
		l[i] = o.latency
	}
	sort.Slice(l, func(i, j int) bool { return l[i] < l[j] })
	return l[min(len(l)-1, int(float64(len(l))*p/100))]
}

// ---- report ----

// figure is one measured value, with the bound it must meet when it has
// one.
type figure struct {
	Name  string  `json:"name"`
	Value float64 `json:"value"`
	Unit  string  `json:"unit,omitempty"`
	// Op and Bound are the bound ("<=", ">=" or "="); empty Op
	// means the figure is informative.
	Op    string  `json:"op,omitempty"`
	Bound float64 `json:"bound"`
	Pass  *bool   `json:"pass,omitempty"`
}

// report is one scenario's result.
type report struct {
	Scenario string   `json:"scenario"`
	Setup    string   `json:"setup"`
	Seconds  float64  `json:"seconds"`
	Figures  []figure `json:"figures"`
	Notes    []string `json:"notes,omitempty"`
	Error    string   `json:"error,omitempty"`
}

// info adds an informative figure.
func (r *report) info(name string, v float64, unit string) {
	r.Figures = append(r.Figures, figure{Name: name, Value: v, Unit: unit})
}

// check adds a figure with its bound and reports whether it holds.
func (r *report) check(name string, v float64, unit, op string, bound float64) bool {
	var ok bool
	switch op {
	case "<=":
		ok = v <= bound
	case ">=":
		ok = v >= bound
	case "=":
		ok = v == bound
	default:
		panic("bench: bad op " + op)
	}
	r.Figures = append(r.Figures, figure{Name: name, Value: v, Unit: unit, Op: op, Bound: bound, Pass: &ok})
	return ok
}

// note adds a line of explanation.
func (r *report) note(format string, args ...any) {
	r.Notes = append(r.Notes, fmt.Sprintf(format, args...))
}

// Passed reports whether every bound held and the scenario ran.
func (r *report) Passed() bool {
	if r.Error != "" {
		return false
	}
	for _, f := range r.Figures {
		if f.Pass != nil && !*f.Pass {
			return false
		}
	}
	return true
}

// Failed lists the figures that missed their bound.
func (r *report) Failed() []string {
	var out []string
	if r.Error != "" {
		out = append(out, "error: "+r.Error)
	}
	for _, f := range r.Figures {
		if f.Pass != nil && !*f.Pass {
			out = append(out, fmt.Sprintf("%s = %s (bound %s %s)", f.Name, fmtVal(f.Value, f.Unit), f.Op, fmtVal(f.Bound, f.Unit)))
		}
	}
	return out
}

func fmtVal(v float64, unit string) string {
	s := fmt.Sprintf("%.4g", v)
	if v == float64(int64(v)) && v < 1e15 && v > -1e15 {
		s = fmt.Sprintf("%d", int64(v))
	}
	if unit != "" {
		s += " " + unit
	}
	return s
}

// write prints the report as a table.
func (r *report) write(w io.Writer) {
	res := "PASS"
	if !r.Passed() {
		res = "FAIL"
	}
	fmt.Fprintf(w, "== %s: %s (%.1fs) %s\n", r.Scenario, r.Setup, r.Seconds, res)
	if r.Error != "" {
		fmt.Fprintf(w, "   error: %s\n", r.Error)
	}
	fmt.Fprintf(w, "   %-66s %14s %14s  %s\n", "figure", "value", "bound", "result")
	for _, f := range r.Figures {
		bound, result := "", ""
		if f.Pass != nil {
			bound = f.Op + " " + fmtVal(f.Bound, f.Unit)
			result = "ok"
			if !*f.Pass {
				result = "FAIL"
			}
		}
		fmt.Fprintf(w, "   %-66s %14s %14s  %s\n", f.Name, fmtVal(f.Value, f.Unit), bound, result)
	}
	for _, n := range r.Notes {
		fmt.Fprintf(w, "   note: %s\n", n)
	}
	fmt.Fprintln(w)
}

// writeJSON prints the reports as one JSON document.
func writeJSON(w io.Writer, rs []*report) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(rs)
}
