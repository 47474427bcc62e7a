package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"
)

// redisSnap is what the suite reads before and after a burst: Redis's
// calls and time (µs) per command and the replicas' admission latency
// histogram.
type redisSnap struct {
	calls, usec map[string]int64
	hist        histogram
}

func (c *replCluster) snapshot(ctx context.Context) (redisSnap, error) {
	calls, usec, err := c.redisCalls(ctx)
	if err != nil {
		return redisSnap{}, err
	}
	hist, err := c.admissionHist()
	return redisSnap{calls, usec, hist}, err
}

// redisCalls returns Redis's calls and time in µs per command (INFO
// commandstats; a script's time includes the commands it runs).
func (c *replCluster) redisCalls(ctx context.Context) (calls, usec map[string]int64, err error) {
	info, err := c.rdb.Info(ctx, "commandstats").Result()
	if err != nil {
		return nil, nil, err
	}
	calls, usec = map[string]int64{}, map[string]int64{}
	for _, l := range strings.Split(info, "\n") {
		name, rest, ok := strings.Cut(strings.TrimSpace(l), ":")
		cmd, isStat := strings.CutPrefix(name, "cmdstat_")
		if !ok || !isStat {
			continue
		}
		for _, f := range strings.Split(rest, ",") {
			k, v, _ := strings.Cut(f, "=")
			n, err := strconv.ParseInt(v, 10, 64)
			switch {
			case err != nil:
			case k == "calls":
				calls[cmd] = n
			case k == "usec":
				usec[cmd] = n
			}
		}
	}
	return calls, usec, nil
}

// callsDiff returns the calls in after that are not in before, in all and
// per command ("evalsha 1990, get 3"), the commands with most calls first.
func callsDiff(before, after map[string]int64) (int64, string) {
	type cmd struct {
		name string
		n    int64
	}
	var cs []cmd
	var total int64
	for name, n := range after {
		if d := n - before[name]; d > 0 {
			cs = append(cs, cmd{name, d})
			total += d
		}
	}
	sort.Slice(cs, func(i, j int) bool { return cs[i].n > cs[j].n || cs[i].n == cs[j].n && cs[i].name < cs[j].name })
	parts := make([]string, len(cs))
	for i, c := range cs {
		parts[i] = fmt.Sprintf("%s %d", c.name, c.n)
	}
	return total, strings.Join(parts, ", ")
}

// histogram is a Prometheus histogram's cumulative bucket counts by upper
// bound (+Inf included).
type histogram map[float64]float64

// admissionHist sums the replicas' keypool_budget_admission_seconds.
func (c *replCluster) admissionHist() (histogram, error) {
	h := histogram{}
	for _, k := range c.reps {
		req, _ := http.NewRequest("GET", "http://"+k.addr+"/metrics", nil)
		req.Header.Set("Authorization", "Bearer "+faultAdminToken)
		resp, err := probeClient.Do(req)
		if err != nil {
			return nil, err
		}
		err = h.add(resp.Body, "keypool_budget_admission_seconds_bucket")
		resp.Body.Close()
		if err != nil {
			return nil, err
		}
	}
	return h, nil
}

// add adds the buckets of metric read from a Prometheus text exposition.
func (h histogram) add(r io.Reader, metric string) error {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<16), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		rest, ok := strings.CutPrefix(l, metric+`{le="`)
		if !ok {
			continue
		}
		le, val, ok := strings.Cut(rest, `"} `)
		if !ok {
			continue
		}
		b, err1 := strconv.ParseFloat(le, 64)
		v, err2 := strconv.ParseFloat(strings.TrimSpace(val), 64)
		if err1 != nil || err2 != nil {
			return fmt.Errorf("bad histogram line %q", l)
		}
		h[b] += v
	}
	return sc.Err()
}

// quantile returns the count of observations in after that are not in
// before, and the upper bound of the bucket holding their q-quantile
// (+Inf past the last bound; 0 without observations).
func quantile(before, after histogram, q float64) (n float64, upper float64) {
	bounds := make([]float64, 0, len(after))
	for b := range after {
		bounds = append(bounds, b)
	}
	sort.Float64s(bounds)
	if len(bounds) == 0 {
		return 0, 0
	}
	n = after[math.Inf(1)] - before[math.Inf(1)]
	if n <= 0 {
		return 0, 0
	}
	for _, b := range bounds {
		if after[b]-before[b] >= q*n {
			return n, b
		}
	}
	return n, math.Inf(1)
}

// bucketBound prints a histogram bucket's upper bound in seconds as a
// duration ("> 1s" past the last bound).
func bucketBound(b float64) string {
	if math.IsInf(b, 1) {
		return "∞ (> 1s)"
	}
	return time.Duration(b * float64(time.Second)).String()
}
