package limit

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"time"
)

// ctrRead is what reserveBatchScript read of one counter: what was
// reserved on it before the batch and its settled usage per window.
// Read-only once parsed: the calls of a batch share it.
type ctrRead struct {
	reserved float64
	used     [Total + 1]float64
	have     [Total + 1]bool // the script read the window
	secs     []secUse        // the minute hash, in Redis's order
}

// secUse is one second of a counter's minute hash.
type secUse struct {
	sec float64
	v   float64
}

var errReply = errors.New("unexpected reply")

// parseCtrRead parses one counter's record of reserveBatchScript's reply;
// nil when no request of the batch reached the counter.
func parseCtrRead(v any) (*ctrRead, error) {
	l, ok := v.([]any)
	if !ok || len(l) != 0 && len(l) != 6 {
		return nil, errReply
	}
	if len(l) == 0 {
		return nil, nil
	}
	c := &ctrRead{}
	s, _ := l[0].(string)
	var err error
	if c.reserved, err = strconv.ParseFloat(s, 64); err != nil {
		return nil, errReply
	}
	for w := Hour; w <= Total; w++ {
		s, ok := l[w-1].(string)
		if !ok {
			return nil, errReply
		}
		if s == "" {
			continue
		}
		if c.used[w], err = strconv.ParseFloat(s, 64); err != nil {
			return nil, errReply
		}
		c.have[w] = true
	}
	h, ok := l[5].([]any)
	if !ok || len(h)%2 != 0 {
		return nil, errReply
	}
	c.secs = make([]secUse, len(h)/2)
	for i := range c.secs {
		f, _ := h[2*i].(string)
		a, _ := h[2*i+1].(string)
		sec, err1 := strconv.ParseFloat(f, 64)
		v, err2 := strconv.ParseFloat(a, 64)
		if err1 != nil || err2 != nil {
			return nil, errReply
		}
		c.secs[i] = secUse{sec, v}
	}
	return c, nil
}

// minute is the counter's usage in the sliding minute ending at sec,
// summed in the script's order (so the float is the script's).
func (c *ctrRead) minute(sec int64) float64 {
	var v float64
	for _, e := range c.secs {
		if e.sec >= float64(sec-60) && e.sec <= float64(sec) {
			v += e.v
		}
	}
	return v
}

// minuteRetry is when a minute limit of block, refusing at used (the
// minute's usage) + reserved, admits again: when enough of the minute's
// oldest seconds have left it, else a minute; in ms, as the script
// computed it before the batch replay.
func (c *ctrRead) minuteRetry(sec, nowMs int64, used, reserved, block float64) time.Duration {
	var in []secUse
	for _, e := range c.secs {
		if e.sec >= float64(sec-60) && e.sec <= float64(sec) {
			in = append(in, e)
		}
	}
	slices.SortFunc(in, func(a, b secUse) int { return int(a.sec - b.sec) })
	left := used
	for _, e := range in {
		left -= e.v
		if e.v != 0 && left+reserved < block {
			return time.Duration((int64(e.sec)+61)*1000-nowMs) * time.Millisecond
		}
	}
	return RateWindow
}

// admitReplay reads reserveBatchScript's reply out for the calls of sent
// (ctrOf: per call, the counter of each charge) and gives each call what
// its decisions are built from: whether it was admitted and, per charge
// it was checked on, the counter as the script read it and what was
// reserved on it when the call's turn came (the reservations before the
// batch plus those of the admitted calls before it in the batch, added in
// the script's order, so the floats are the script's).
func admitReplay(out []any, sent []*admitCall, ctrOf [][]int) error {
	if len(out) == 1 {
		if v, _ := out[0].(int64); v == -1 {
			for _, c := range sent {
				c.unseeded = true
			}
			return nil
		}
	}
	if len(out) != 3 {
		return fmt.Errorf("%w: %d values", errReply, len(out))
	}
	first, ok0 := out[0].(int64)
	whichs, ok1 := out[1].([]any)
	recs, ok2 := out[2].([]any)
	if !ok0 || !ok1 || !ok2 || first < 1 || int(first)-1+len(whichs) != len(sent) {
		return fmt.Errorf("%w: %d decisions from %d for %d requests", errReply, len(whichs), first, len(sent))
	}
	ctrs := make([]*ctrRead, len(recs))
	running := make([]float64, len(recs))
	for i, v := range recs {
		c, err := parseCtrRead(v)
		if err != nil {
			return err
		}
		if c != nil {
			ctrs[i], running[i] = c, c.reserved
		}
	}
	// Each call's decision and how many charges it was checked on; their
	// reads in two allocations for the batch.
	total := 0
	for ci, c := range sent {
		var w int64 // admitted under the guard (see reserveBatchScript)
		if ci >= int(first)-1 {
			var ok bool
			if w, ok = whichs[ci-int(first)+1].(int64); !ok || w < 0 || int(w) > len(c.charges) {
				return fmt.Errorf("%w: decision %v", errReply, whichs[ci-int(first)+1])
			}
		}
		c.which = int(w)
		total += c.checked()
	}
	reserved, reads := make([]float64, total), make([]*ctrRead, total)
	for ci, c := range sent {
		w, n := c.which, c.checked()
		c.reserved, c.ctrs = reserved[:n:n], reads[:n:n]
		reserved, reads = reserved[n:], reads[n:]
		for i := range n {
			k := ctrOf[ci][i]
			if k >= len(ctrs) || ctrs[k] == nil {
				return fmt.Errorf("%w: counter %d not read", errReply, k)
			}
			c.reserved[i], c.ctrs[i] = running[k], ctrs[k]
		}
		if w == 0 {
			for i, ch := range c.charges {
				if ch.Amount > 0 {
					running[ctrOf[ci][i]] += ch.Amount
				}
			}
		}
	}
	return nil
}

// checked is how many of the call's charges the script checked: all when
// it was admitted, else up to the one that refused.
func (c *admitCall) checked() int {
	if c.which > 0 {
		return c.which
	}
	return len(c.charges)
}

// decide fills ds with the call's decisions on the charges it was checked
// on, by the rule of [Limit] (the same check as [Local]) applied to what
// the script read, and returns the room left under each one's tightest
// block after the request (+Inf without one, 0 when refused), when rooms
// is set. An error means the replay disagrees with the script's decision.
func (c *admitCall) decide(ds []Decision, rooms bool) ([]float64, error) {
	n := len(c.reserved)
	var room []float64
	if rooms {
		room = make([]float64, n)
	}
	sec, nowMs := c.now.Unix(), c.now.UnixMilli()
	for i := range n {
		ch, cr, reserved := c.charges[i], c.ctrs[i], c.reserved[i]
		missing := false
		used := func(w Window) float64 {
			if w == Minute {
				return cr.minute(sec)
			}
			if !cr.have[w] {
				missing = true
			}
			return cr.used[w]
		}
		retry := func(l Limit, u float64) time.Duration {
			if l.Window == Minute {
				return cr.minuteRetry(sec, nowMs, u, reserved, l.Block)
			}
			return time.Duration(calRetry(l.Window, c.now).Milliseconds()) * time.Millisecond
		}
		d := check(ch.Limits, ch.Amount, reserved, used, retry)
		if want := c.which == 0 || i < n-1; missing || d.Allowed != want {
			return nil, fmt.Errorf("%w: the replay of charge %d disagrees with the script", errReply, i)
		}
		ds[i] = d
		if rooms && d.Allowed {
			room[i] = math.Inf(1)
			for _, l := range ch.Limits {
				if l.Block > 0 {
					room[i] = min(room[i], l.Block-(used(l.Window)+reserved+ch.Amount))
				}
			}
			room[i] = max(room[i], 0)
		}
	}
	return room, nil
}
