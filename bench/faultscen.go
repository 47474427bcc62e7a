package main

import (
	"context"
	"fmt"
	"math"
	"net/http"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// stage starts an upstream answering with b and keypoold serving svc on
// it, with a team token, and returns a function that stops both.
func stage(ctx context.Context, fc faultConfig, b behaviour, svc serviceSpec, drain time.Duration) (*upstream, *keypoold, func(), error) {
	up, err := startUpstream(b)
	if err != nil {
		return nil, nil, nil, err
	}
	kp, err := newKeypoold(fc.bin, fc.dir, up.url, svc, fc.logLevel, drain)
	if err != nil {
		up.close()
		return nil, nil, nil, err
	}
	stop := func() { kp.close(); up.close() }
	if fc.track != nil {
		fc.track(stop)
	}
	if err := kp.start(ctx); err != nil {
		stop()
		return nil, nil, nil, err
	}
	if err := kp.createClient(ctx); err != nil {
		stop()
		return nil, nil, nil, err
	}
	return up, kp, stop, nil
}

// chatURL is the proxy URL of service svc's chat completions.
func (k *keypoold) chatURL(svc string) string {
	return "http://" + k.addr + "/v1/" + svc + "/v1/chat/completions"
}

// failures counts the outcomes that are not a whole 200, and sums them
// by status ("error" for no answer).
func failures(os []outcome) (int, string) {
	by := map[string]int{}
	n := 0
	for _, o := range os {
		if o.ok {
			continue
		}
		n++
		k := strconv.Itoa(o.status)
		if o.status == 0 {
			k = "error"
		}
		if o.code != "" {
			k += " " + o.code
		}
		by[k]++
	}
	keys := make([]string, 0, len(by))
	for k := range by {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	s := ""
	for _, k := range keys {
		s += fmt.Sprintf(" %s×%d", k, by[k])
	}
	return n, s
}

// stormLimits spreads the keys' limits per window from a fifth of mean to
// nine fifths of it, so that some keys are always over their limit under
// an even share of the load and others have room.
func stormLimits(keys, mean int) []int {
	out := make([]int, keys)
	for i := range out {
		f := 0.2 + 1.6*float64(i)/float64(max(keys-1, 1))
		out[i] = max(1, int(math.Round(float64(mean)*f)))
	}
	return out
}

// runStorm is the 429 storm.
func runStorm(ctx context.Context, fc faultConfig, r *report) error {
	limits := stormLimits(fc.stormKeys, fc.stormMean)
	total := 0
	for _, l := range limits {
		total += l
	}
	capacity := float64(total) / fc.stormWindow.Seconds()
	rate := fc.stormLoad * capacity
	lim := newLimiter(limits, fc.stormWindow)
	up, kp, stop, err := stage(ctx, fc, lim.behave, serviceSpec{name: "storm", keys: fc.stormKeys, llmFamily: "openai"}, 5*time.Second)
	if err != nil {
		return err
	}
	defer stop()
	r.Setup = fmt.Sprintf("%d keys allowing %d..%d requests per %v each (%.0f req/s in all), %d clients offering %.0f req/s (%.0f%%, Poisson arrivals), %d requests",
		fc.stormKeys, limits[0], limits[len(limits)-1], fc.stormWindow, capacity, fc.clients, rate, fc.stormLoad*100, fc.stormRequests)
	c := loadClient(fc.clients)
	defer c.CloseIdleConnections()
	t0 := time.Now()
	out := runLoad(ctx, loadSpec{prefix: "storm", requests: fc.stormRequests, clients: fc.clients, rate: rate, poisson: true}, nil, chatSender(c, kp.chatURL("storm"), kp.token))
	elapsed := time.Since(t0)
	n, by := failures(out)
	attempts := up.attempts.Load()
	done := make(map[string]time.Time, len(out))
	started := make(map[string]time.Time, len(out))
	for _, o := range out {
		started[o.id] = o.end.Add(-o.latency)
		if o.status != 0 {
			done[o.id] = o.end
		}
	}
	early := lim.early(done, started)
	lim.mu.Lock()
	limited, by429 := len(lim.refusals), lim.by429
	lim.mu.Unlock()
	r.check("client-visible failures", float64(n), "", "=", 0)
	r.check("requests to a key before its Retry-After", float64(early.Strict), "", "=", 0)
	r.check("upstream attempts / requests", float64(attempts)/float64(max(len(out), 1)), "", "<=", 1.2)
	r.info("requests", float64(len(out)), "")
	r.info("achieved rate", math.Round(float64(len(out))/elapsed.Seconds()), "req/s")
	r.info("upstream attempts", float64(attempts), "")
	r.info("upstream 429s", float64(limited), "")
	for i, f := range retryForms {
		r.info("  429s with "+f, float64(by429[i]), "")
	}
	for i, f := range retryForms {
		r.info("  requests before a Retry-After given as "+f, float64(early.ByForm[i]), "")
	}
	r.info("requests before the latest Retry-After of the key", float64(early.Latest), "")
	r.info("requests before a Retry-After, 429 maybe still on the wire", float64(early.OnWire), "")
	r.info("client p50", ms2(percentile(out, 50)), "ms")
	r.info("client p99", ms2(percentile(out, 99)), "ms")
	if n > 0 {
		r.note("client-visible failures by status:%s", by)
	}
	r.note("a request to a key before its Retry-After counts when keypoold had certainly read that 429 before sending it (the refused request's client had its answer before this request's client sent it, or it is the refused request's next attempt)")
	if up.noID.Load() > 0 {
		r.note("%d upstream requests carried no X-Request-Id", up.noID.Load())
	}
	return nil
}

// ms2 is d in milliseconds, rounded to 0.1.
func ms2(d time.Duration) float64 { return math.Round(float64(d)/1e5) / 10 }

// runDeadKey is one key of many that always answers 500.
func runDeadKey(ctx context.Context, fc faultConfig, r *report) error {
	dead := func(w http.ResponseWriter, req *http.Request, k int) bool {
		if k == 0 {
			errorAnswer(w, http.StatusInternalServerError, "server_error", "internal_error")
			return false
		}
		return okChat(w, req, 0)
	}
	up, kp, stop, err := stage(ctx, fc, dead, serviceSpec{name: "deadkey", keys: fc.deadKeys, llmFamily: "openai"}, 5*time.Second)
	if err != nil {
		return err
	}
	defer stop()
	r.Setup = fmt.Sprintf("%d keys, key 0 always 500, %d clients at %.0f req/s, %d requests", fc.deadKeys, fc.clients, fc.deadRate, fc.deadRequests)
	c := loadClient(fc.clients)
	defer c.CloseIdleConnections()
	t0 := time.Now()
	out := runLoad(ctx, loadSpec{prefix: "dead", requests: fc.deadRequests, clients: fc.clients, rate: fc.deadRate}, nil, chatSender(c, kp.chatURL("deadkey"), kp.token))
	elapsed := time.Since(t0)
	n, by := failures(out)
	cycles := max(1, int(math.Ceil(elapsed.Seconds()/fc.breakerOpen.Seconds())))
	bound := fc.breakerThreshold + fc.breakerProbes*cycles
	r.check("attempts on the dead key", float64(up.perKey[0].Load()), "", "<=", float64(bound))
	r.check("client-visible failures", float64(n), "", "=", 0)
	r.info("requests", float64(len(out)), "")
	r.info("upstream attempts / requests", float64(up.attempts.Load())/float64(max(len(out), 1)), "")
	r.info("client p99", ms2(percentile(out, 99)), "ms")
	r.note("bound = breaker threshold %d + %d half-open probes × %d open period(s) of %v in %.1fs", fc.breakerThreshold, fc.breakerProbes, cycles, fc.breakerOpen, elapsed.Seconds())
	if n > 0 {
		r.note("client-visible failures by status:%s", by)
	}
	return nil
}

// outageUp is the outage's upstream: every key 503 while down.
type outageUp struct {
	down    atomic.Bool
	refused atomic.Int64 // 503s written
}

func (o *outageUp) behave(w http.ResponseWriter, r *http.Request, _ int) bool {
	if o.down.Load() {
		o.refused.Add(1)
		errorAnswer(w, http.StatusServiceUnavailable, "server_error", "overloaded")
		return false
	}
	return okChat(w, r, 0)
}

// recoveryWatch buckets outcomes by the second they started after the
// recovery, to tell when success held again.
type recoveryWatch struct {
	mu      sync.Mutex // protects the fields below
	upAt    time.Duration
	started bool
	buckets map[int][2]int // second since recovery → {requests, ok}
}

func (w *recoveryWatch) add(o outcome) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.started || o.start < w.upAt {
		return
	}
	b := int((o.start - w.upAt) / time.Second)
	v := w.buckets[b]
	v[0]++
	if o.ok {
		v[1]++
	}
	w.buckets[b] = v
}

// recoveredAt returns the first second after which every bucket up to
// last has >= 99% success, or -1.
func (w *recoveryWatch) recoveredAt(last int) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	at := -1
	for b := 0; b <= last; b++ {
		v := w.buckets[b]
		good := v[0] > 0 && float64(v[1]) >= 0.99*float64(v[0])
		switch {
		case good && at < 0:
			at = b
		case !good:
			at = -1
		}
	}
	return at
}

// runOutage is every key 503 for fc.outage, then healthy.
func runOutage(ctx context.Context, fc faultConfig, r *report) error {
	ou := &outageUp{}
	up, kp, stop, err := stage(ctx, fc, ou.behave, serviceSpec{name: "outage", keys: 10, llmFamily: "openai"}, 5*time.Second)
	if err != nil {
		return err
	}
	defer stop()
	warm := 2 * time.Second
	limit := 2 * fc.breakerOpen
	r.Setup = fmt.Sprintf("10 keys all 503 for %v after %v, %d clients at %.0f req/s, until success holds %v (at most %v after recovery)",
		fc.outage, warm, fc.clients, fc.outageRate, fc.outageHold, limit+fc.outageHold)
	c := loadClient(fc.clients)
	defer c.CloseIdleConnections()
	watch := &recoveryWatch{buckets: map[int][2]int{}}
	stopLoad := make(chan struct{})
	var downAt, upAt time.Duration
	var attemptsDown int64
	var phase sync.WaitGroup
	t0 := time.Now()
	phase.Go(func() {
		defer close(stopLoad)
		waitCtx(ctx, warm)
		downAt = time.Since(t0)
		a0 := up.attempts.Load()
		ou.down.Store(true)
		waitCtx(ctx, fc.outage)
		ou.down.Store(false)
		attemptsDown = up.attempts.Load() - a0
		watch.mu.Lock()
		upAt, watch.upAt, watch.started = time.Since(t0), time.Since(t0), true
		watch.mu.Unlock()
		hold := int(fc.outageHold / time.Second)
		for ctx.Err() == nil {
			waitCtx(ctx, 250*time.Millisecond)
			since := time.Since(t0) - upAt
			last := int(since/time.Second) - 2 // seconds whose requests have ended
			if at := watch.recoveredAt(last); at >= 0 && last-at+1 >= hold {
				return
			}
			if since > limit+fc.outageHold {
				return
			}
		}
	})
	out := runLoad(ctx, loadSpec{prefix: "outage", clients: fc.clients, rate: fc.outageRate, onResult: watch.add}, stopLoad, chatSender(c, kp.chatURL("outage"), kp.token))
	phase.Wait()
	var during, after []outcome
	for _, o := range out {
		switch {
		case o.start >= downAt && o.start < upAt:
			during = append(during, o)
		case o.start >= upAt:
			after = append(after, o)
		}
	}
	lastFull := -1
	if len(after) > 0 {
		lastFull = int((after[len(after)-1].start-upAt)/time.Second) - 1
	}
	at := watch.recoveredAt(lastFull)
	recovery := float64(at)
	if at < 0 {
		recovery = math.Round((time.Since(t0) - upAt).Seconds())
	}
	okAfter := 0
	var heldFrom []outcome
	for _, o := range after {
		if o.ok {
			okAfter++
		}
		if at >= 0 && o.start-upAt >= time.Duration(at)*time.Second {
			heldFrom = append(heldFrom, o)
		}
	}
	okHeld := 0
	for _, o := range heldFrom {
		if o.ok {
			okHeld++
		}
	}
	r.check("client p99 during the outage", ms2(percentile(during, 99)), "ms", "<=", 1000)
	r.check("upstream attempts / requests during the outage", float64(attemptsDown)/float64(max(len(during), 1)), "", "<=", 1.2)
	r.check("seconds after recovery until >= 99% success holds", recovery, "s", "<=", limit.Seconds())
	r.info("requests during the outage", float64(len(during)), "")
	r.info("upstream attempts / requests over the whole run", float64(up.attempts.Load())/float64(max(len(out), 1)), "")
	r.info("upstream 503s", float64(ou.refused.Load()), "")
	r.info("requests after recovery", float64(len(after)), "")
	r.info("success after recovery (all)", math.Round(1000*float64(okAfter)/float64(max(len(after), 1)))/10, "%")
	if at >= 0 {
		r.info("success once recovered", math.Round(1000*float64(okHeld)/float64(max(len(heldFrom), 1)))/10, "%")
	}
	_, by := failures(during)
	r.note("answers during the outage by status:%s", by)
	r.note("recovery bound = 2 × breaker open time %v; success held = every 1 s bucket >= 99%% for %v", fc.breakerOpen, fc.outageHold)
	return nil
}
