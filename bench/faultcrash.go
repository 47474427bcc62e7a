package main

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// recordCheck compares keypoold's usage records with the request ids the
// upstream answered with a 2xx.
type recordCheck struct {
	served     int // ids the upstream answered with a 2xx
	missing    int // of those, ids without a usage record
	duplicates int // records beyond the first for one id
	extra      int // records for ids the upstream did not answer with a 2xx
	missingIDs map[string]bool
}

func compareRecords(served map[string]int, recs []usageRecord) recordCheck {
	per := map[string]int{}
	for _, rec := range recs {
		per[rec.requestID]++
	}
	c := recordCheck{served: len(served), missingIDs: map[string]bool{}}
	for id := range served {
		if per[id] == 0 {
			c.missing++
			c.missingIDs[id] = true
		}
	}
	for id, n := range per {
		if n > 1 {
			c.duplicates += n - 1
		}
		if served[id] == 0 {
			c.extra += n
		}
	}
	return c
}

// runKill is kill -9 of keypoold, fc.kills times at random moments under
// load, each followed by a restart on the same data directory.
func runKill(ctx context.Context, fc faultConfig, r *report) error {
	b := func(w http.ResponseWriter, req *http.Request, _ int) bool { return okChat(w, req, 10*time.Millisecond) }
	up, kp, stop, err := stage(ctx, fc, b, serviceSpec{name: "kill", keys: 4, llmFamily: "openai"}, 5*time.Second)
	if err != nil {
		return err
	}
	defer stop()
	r.Setup = fmt.Sprintf("kill -9 × %d at random (every %v on average) under %d clients at %.0f req/s, restart each time on the same SQLite",
		fc.kills, fc.killEvery, fc.clients, fc.killRate)
	c := loadClient(fc.clients)
	defer c.CloseIdleConnections()
	stopLoad := make(chan struct{})
	var restartErr error
	var downtime time.Duration
	var killer sync.WaitGroup
	killer.Go(func() {
		defer close(stopLoad)
		for range fc.kills {
			waitCtx(ctx, time.Duration(float64(fc.killEvery)*(0.5+rand.Float64())))
			if ctx.Err() != nil {
				return
			}
			kp.kill()
			t := time.Now()
			if err := kp.start(ctx); err != nil {
				restartErr = err
				return
			}
			downtime += time.Since(t)
		}
		waitCtx(ctx, time.Second)
	})
	out := runLoad(ctx, loadSpec{prefix: "kill", clients: fc.clients, rate: fc.killRate, pause: 20 * time.Millisecond}, stopLoad, chatSender(c, kp.chatURL("kill"), kp.token))
	killer.Wait()
	if restartErr != nil {
		return restartErr
	}
	c.CloseIdleConnections()
	code := kp.terminate(30 * time.Second)
	recs, err := kp.usageRecords(ctx)
	if err != nil {
		return err
	}
	rc := compareRecords(up.servedIDs(), recs)
	okLost := 0
	for _, o := range out {
		if o.ok && rc.missingIDs[o.id] {
			okLost++
		}
	}
	n, by := failures(out)
	r.check("upstream 2xx without a usage record", float64(rc.missing), "", "=", 0)
	r.check("duplicate usage records", float64(rc.duplicates), "", "=", 0)
	r.check("exit code of the last, graceful stop", float64(code), "", "=", 0)
	r.info("kills", float64(kp.starts-1), "")
	r.info("requests", float64(len(out)), "")
	r.info("requests the upstream answered with a 2xx", float64(rc.served), "")
	r.info("usage records", float64(len(recs)), "")
	r.info("  missing although the client got its 200", float64(okLost), "")
	r.info("  records of requests without an upstream 2xx", float64(rc.extra), "")
	r.info("client failures (refused or cut by the kills)", float64(n), "")
	r.info("mean restart time", ms2(downtime/time.Duration(max(kp.starts-1, 1))), "ms")
	if n > 0 {
		r.note("client failures by status:%s", by)
	}
	return nil
}

// runSigterm is SIGTERM under load.
func runSigterm(ctx context.Context, fc faultConfig, r *report) error {
	b := func(w http.ResponseWriter, req *http.Request, _ int) bool { return okChat(w, req, fc.termDelay) }
	up, kp, stop, err := stage(ctx, fc, b, serviceSpec{name: "sigterm", keys: 4, llmFamily: "openai"}, fc.termDrain)
	if err != nil {
		return err
	}
	defer stop()
	r.Setup = fmt.Sprintf("%d clients back to back, upstream answers in %v, SIGTERM after %v (drain timeout %v)", fc.clients, fc.termDelay, fc.termAfter, fc.termDrain)
	c := loadClient(fc.clients)
	defer c.CloseIdleConnections()
	stopLoad := make(chan struct{})
	var code int
	var sigAt time.Duration
	var term sync.WaitGroup
	t0 := time.Now()
	term.Go(func() {
		defer close(stopLoad)
		waitCtx(ctx, fc.termAfter)
		sigAt = time.Since(t0)
		code = kp.terminate(30 * time.Second)
	})
	var refusedAfter atomic.Int64
	send := chatSender(c, kp.chatURL("sigterm"), kp.token)
	out := runLoad(ctx, loadSpec{prefix: "term", clients: fc.clients, pause: 50 * time.Millisecond}, stopLoad, func(ctx context.Context, id string) outcome {
		o := send(ctx, id)
		if o.refused {
			refusedAfter.Add(1)
		}
		return o
	})
	term.Wait()
	recs, err := kp.usageRecords(ctx)
	if err != nil {
		return err
	}
	rc := compareRecords(up.servedIDs(), recs)
	var inFlight, dropped, answered, beforeUpstream int
	var notes []string
	for _, o := range out {
		t1 := o.start + o.latency
		if o.start < sigAt && t1 > sigAt {
			inFlight++
		}
		if o.ok || o.refused {
			continue
		}
		switch {
		case up.sawID(o.id):
			dropped++
			if len(notes) < 3 {
				notes = append(notes, fmt.Sprintf("%s: status %d %s", o.id, o.status, o.err))
			}
		case o.status != 0:
			answered++
		default:
			beforeUpstream++
		}
	}
	r.check("in-flight requests dropped (reached the upstream, no 200)", float64(dropped), "", "=", 0)
	r.check("exit code", float64(code), "", "=", 0)
	r.check("upstream 2xx without a usage record after exit", float64(rc.missing), "", "=", 0)
	r.check("duplicate usage records", float64(rc.duplicates), "", "=", 0)
	r.info("requests in flight at SIGTERM", float64(inFlight), "")
	r.info("requests", float64(len(out)), "")
	r.info("refused connections after SIGTERM", float64(refusedAfter.Load()), "")
	r.info("refused by keypoold with an error status", float64(answered), "")
	r.info("failed before reaching the upstream (keep-alive race)", float64(beforeUpstream), "")
	r.info("usage records", float64(len(recs)), "")
	for _, n := range notes {
		r.note("dropped %s", n)
	}
	return nil
}

// runSSE is clients hanging up in the middle of SSE streams.
func runSSE(ctx context.Context, fc faultConfig, r *report) error {
	ss := &sseStream{events: 20, gap: 50 * time.Millisecond}
	up, kp, stop, err := stage(ctx, fc, ss.behave, serviceSpec{name: "sse", keys: 4, llmFamily: "openai"}, 5*time.Second)
	if err != nil {
		return err
	}
	defer stop()
	r.Setup = fmt.Sprintf("%d clients hang up after the first event of a 1 s SSE stream, %d at a time, 4 keys", fc.disconnects, fc.sseConcurrent)
	url := kp.chatURL("sse")
	c := loadClient(fc.sseConcurrent)
	// Warm up with whole streams, then let every connection go idle and
	// close, and take the baseline.
	var wg sync.WaitGroup
	for i := range 10 {
		wg.Go(func() { _ = streamOnce(ctx, c, url, kp.token, fmt.Sprintf("sse-warm-%d", i), false) })
	}
	wg.Wait()
	settle := func() {
		c.CloseIdleConnections()
		up.closeIdle()
		time.Sleep(500 * time.Millisecond)
	}
	settle()
	fd0, err := kp.fds()
	if err != nil {
		return err
	}
	g0, err := kp.goroutines(ctx)
	if err != nil {
		return err
	}
	var cutOK atomic.Int64
	sem := make(chan struct{}, fc.sseConcurrent)
	ids := make([]string, fc.disconnects)
	for i := range fc.disconnects {
		ids[i] = fmt.Sprintf("sse-cut-%d", i)
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			if streamOnce(ctx, c, url, kp.token, ids[i], true) {
				cutOK.Add(1)
			}
		})
	}
	wg.Wait()
	// Wait for keypoold to notice every hang-up and close the upstream
	// streams, then for its descriptors and goroutines to settle.
	deadline := time.Now().Add(15 * time.Second)
	for ss.cut.Load() < int64(fc.disconnects) && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	var fd1, g1 int
	for {
		settle()
		if fd1, err = kp.fds(); err != nil {
			return err
		}
		if g1, err = kp.goroutines(ctx); err != nil {
			return err
		}
		if (fd1 <= fd0+fc.fdSlack && g1 <= g0+fc.goSlack) || time.Now().After(deadline) {
			break
		}
	}
	keys, err := kp.keys(ctx, "sse")
	if err != nil {
		return err
	}
	penalised := 0
	var states []string
	for _, k := range keys {
		if k.State != "active" || (k.Breaker != "" && k.Breaker != "closed") || k.Status != "active" || k.CooldownUntil != nil {
			penalised++
		}
		states = append(states, k.State)
	}
	code := kp.terminate(30 * time.Second)
	recs, err := kp.usageRecords(ctx)
	if err != nil {
		return err
	}
	per := map[string][]usageRecord{}
	for _, rec := range recs {
		if strings.HasPrefix(rec.requestID, "sse-cut-") {
			per[rec.requestID] = append(per[rec.requestID], rec)
		}
	}
	with, s499, dup, withTokens := 0, 0, 0, 0
	statuses := map[int]int{}
	for _, id := range ids {
		rs := per[id]
		if len(rs) > 0 {
			with++
			statuses[rs[0].status]++
			if rs[0].status == 499 {
				s499++
			}
			if rs[0].tokens > 0 {
				withTokens++
			}
		}
		if len(rs) > 1 {
			dup += len(rs) - 1
		}
	}
	r.check("disconnects that saw the first event", float64(cutOK.Load()), "", "=", float64(fc.disconnects))
	r.check("open file descriptors after (baseline "+fmt.Sprint(fd0)+")", float64(fd1), "", "<=", float64(fd0+fc.fdSlack))
	r.check("goroutines after (baseline "+fmt.Sprint(g0)+")", float64(g1), "", "<=", float64(g0+fc.goSlack))
	r.check("keys penalised", float64(penalised), "", "=", 0)
	r.check("disconnects with a usage record", float64(with), "", "=", float64(fc.disconnects))
	r.check("  of which status 499", float64(s499), "", "=", float64(fc.disconnects))
	r.check("duplicate usage records", float64(dup), "", "=", 0)
	r.check("exit code", float64(code), "", "=", 0)
	r.info("  of which with tokens charged", float64(withTokens), "")
	r.info("upstream streams cut", float64(ss.cut.Load()), "")
	r.note("key states: %s; record statuses: %v", strings.Join(states, ","), statuses)
	r.note("baseline taken with every connection closed; slack %d descriptors, %d goroutines", fc.fdSlack, fc.goSlack)
	return nil
}

// streamOnce opens a streamed chat completion; with cut it hangs up after
// the first event and reports whether that event arrived, else it reads
// the stream to the end and reports whether it ended with [DONE].
func streamOnce(ctx context.Context, c *http.Client, url, token, id string, cut bool) bool {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	body := `{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hello"}]}`
	req, err := http.NewRequestWithContext(ctx, "POST", url, strings.NewReader(body))
	if err != nil {
		return false
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("X-Request-Id", id)
	resp, err := c.Do(req)
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return false
	}
	br := bufio.NewReader(resp.Body)
	for {
		line, err := br.ReadString('\n')
		if strings.HasPrefix(line, "data: ") {
			if cut {
				cancel() // hang up: the connection is closed, not reused
				return true
			}
			if strings.HasPrefix(line, "data: [DONE]") {
				return true
			}
		}
		if err != nil {
			return false
		}
	}
}
