package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// wave is one wave of concurrent SSE streams through one proxy.
type wave struct {
	wall time.Duration   // from the start gate to the end of the last stream
	ttfe []time.Duration // per stream: request sent to its first event read
	errs int             // streams that failed (not 200, or not every event)
}

// streamsOnce opens n concurrent SSE streams through t at once and
// measures the wave.
func streamsOnce(ctx context.Context, t target, n int) wave {
	client := newClient(n)
	defer client.CloseIdleConnections()
	var errs atomic.Int64
	ttfe := make([]time.Duration, n)
	var wg sync.WaitGroup
	startGate := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-startGate
			ttfe[i] = -1
			if err := oneStream(ctx, client, t, &ttfe[i]); err != nil {
				errs.Add(1)
			}
		})
	}
	start := time.Now()
	close(startGate)
	wg.Wait()
	w := wave{wall: time.Since(start), errs: int(errs.Load())}
	for _, d := range ttfe {
		if d >= 0 {
			w.ttfe = append(w.ttfe, d)
		}
	}
	return w
}

// oneStream reads one SSE stream to its end, noting when its first event
// arrived.
func oneStream(ctx context.Context, client *http.Client, t target, ttfe *time.Duration) error {
	req, err := http.NewRequestWithContext(ctx, "GET", t.streamURL(), nil)
	if err != nil {
		return err
	}
	if t.token != "" {
		req.Header.Set("Authorization", "Bearer "+t.token)
	}
	t0 := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var b strings.Builder
	buf := make([]byte, 4096)
	for {
		n, err := resp.Body.Read(buf)
		if n > 0 && b.Len() == 0 {
			*ttfe = time.Since(t0)
		}
		b.Write(buf[:n])
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
	}
	if resp.StatusCode != 200 || strings.Count(b.String(), "data: ") != streamEvents+1 {
		return fmt.Errorf("status %d, %d events", resp.StatusCode, strings.Count(b.String(), "data: "))
	}
	return nil
}

// streamStats sums up one proxy's waves.
type streamStats struct {
	waves      int
	streams    int
	errs       int
	wall       time.Duration // all waves
	waveMedian time.Duration
	ttfe50     time.Duration
	ttfe99     time.Duration
	rss        int64 // peak, bytes
}

func summarize(ws []wave, rss int64) streamStats {
	s := streamStats{waves: len(ws), rss: rss}
	var walls, ttfe []time.Duration
	for _, w := range ws {
		s.wall += w.wall
		s.errs += w.errs
		s.streams += len(w.ttfe)
		walls = append(walls, w.wall)
		ttfe = append(ttfe, w.ttfe...)
	}
	s.streams += s.errs
	s.waveMedian = median(walls)
	sort.Slice(ttfe, func(i, j int) bool { return ttfe[i] < ttfe[j] })
	if len(ttfe) > 0 {
		s.ttfe50 = ttfe[len(ttfe)/2]
		s.ttfe99 = ttfe[min(len(ttfe)-1, len(ttfe)*99/100)]
	}
	return s
}

// streamsReport prints both proxies' figures and keypoold's against the
// bare proxy's: wall time ratio, time to first event added, RSS ratio.
func streamsReport(bare, kp streamStats) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%-9s %10s %10s %10s %10s %10s %8s\n", "", "wall", "wave p50", "TTFE p50", "TTFE p99", "peak RSS", "errors")
	row := func(name string, s streamStats) {
		fmt.Fprintf(&b, "%-9s %9.2fs %9.2fs %10s %10s %6.1f MiB %4d/%d\n", name, s.wall.Seconds(), s.waveMedian.Seconds(),
			ms(s.ttfe50), ms(s.ttfe99), float64(s.rss)/(1<<20), s.errs, s.streams)
	}
	row("bare", bare)
	row("keypoold", kp)
	fmt.Fprintf(&b, "ratio keypoold/bare: wall %.3f, peak RSS %.3f; TTFE p50 added %s\n",
		kp.wall.Seconds()/max(bare.wall.Seconds(), 1e-9), float64(kp.rss)/float64(max(bare.rss, 1)), ms(kp.ttfe50-bare.ttfe50))
	return b.String()
}

// sequentialTTFE opens n SSE streams through t one after another on one
// kept-alive connection and returns each stream's time to first event:
// the latency a proxy adds to a stream's start when nothing else competes
// for the CPU (the waves measure it under a burst).
func sequentialTTFE(ctx context.Context, t target, n int) ([]time.Duration, int) {
	client := newClient(1)
	defer client.CloseIdleConnections()
	var out []time.Duration
	errs := 0
	for range n {
		d := time.Duration(-1)
		if err := oneStream(ctx, client, t, &d); err != nil || d < 0 {
			errs++
			continue
		}
		out = append(out, d)
	}
	return out, errs
}

// sequentialReport prints the time to first event of one stream at a
// time through each proxy, and what keypoold adds to the bare proxy's.
func sequentialReport(bare, kp []time.Duration, errs int) string {
	pct := func(xs []time.Duration, p int) time.Duration {
		if len(xs) == 0 {
			return 0
		}
		s := append([]time.Duration(nil), xs...)
		sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
		return s[min(len(s)-1, len(s)*p/100)]
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%-9s %10s %10s %8s\n", "", "TTFE p50", "TTFE p99", "streams")
	fmt.Fprintf(&b, "%-9s %10s %10s %8d\n", "bare", ms(pct(bare, 50)), ms(pct(bare, 99)), len(bare))
	fmt.Fprintf(&b, "%-9s %10s %10s %8d\n", "keypoold", ms(pct(kp, 50)), ms(pct(kp, 99)), len(kp))
	fmt.Fprintf(&b, "keypoold adds to the first event, one stream at a time: p50 %s, p99 %s (%d errors)\n",
		ms(pct(kp, 50)-pct(bare, 50)), ms(pct(kp, 99)-pct(bare, 99)), errs)
	return b.String()
}

// streamsMode runs the streams mode: one stream at a time through each
// proxy, then waves of nStreams concurrent streams, and prints both
// reports.
func streamsMode(ctx context.Context, tBare, tKP target, bare, kp *child, nStreams, waves int) error {
	// One stream at a time first: the latency a proxy adds to the
	// first event, alternating proxies in runs of 10.
	const seqRuns, seqPer = 5, 10
	fmt.Printf("\n== one SSE stream at a time (%d each), keypoold and bare alternating\n", seqRuns*seqPer)
	var sb, sk []time.Duration
	seqErrs := 0
	for r := range seqRuns {
		ts, outs := []target{tBare, tKP}, []*[]time.Duration{&sb, &sk}
		if r%2 == 1 {
			ts[0], ts[1], outs[0], outs[1] = ts[1], ts[0], outs[1], outs[0]
		}
		for i, t := range ts {
			d, e := sequentialTTFE(ctx, t, seqPer)
			*outs[i] = append(*outs[i], d...)
			seqErrs += e
		}
	}
	fmt.Print(sequentialReport(sb, sk, seqErrs))
	fmt.Printf("\n== %d concurrent SSE streams of %v (%d events), %d waves, keypoold and bare alternating\n", nStreams, streamEvents*streamGap, streamEvents+1, waves)
	bare.resetPeakRSS()
	kp.resetPeakRSS()
	var wb, wk []wave
	for w := range waves {
		ts, outs := []target{tBare, tKP}, []*[]wave{&wb, &wk}
		if w%2 == 1 {
			ts[0], ts[1], outs[0], outs[1] = ts[1], ts[0], outs[1], outs[0]
		}
		for i, t := range ts {
			*outs[i] = append(*outs[i], streamsOnce(ctx, t, nStreams))
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	fmt.Print(streamsReport(summarize(wb, bare.peakRSS()), summarize(wk, kp.peakRSS())))
	return nil
}
