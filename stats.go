package keypool

import (
	"math"
	"time"
)

// KeyStats is a snapshot of one key's live state.
type KeyStats struct {
	ID      string `json:"id"`
	Service string `json:"service"`
	Hint    string `json:"hint"`
	State   State  `json:"state"`
	Reason  string `json:"reason,omitempty"`
	// Until is when a Cooling, Open or Exhausted key is expected back.
	Until              time.Time     `json:"cooldown_until,omitzero"`
	InFlight           int64         `json:"in_flight"`
	RequestsLastMinute int           `json:"requests_last_minute"`
	Requests           uint64        `json:"requests"`
	Failures           uint64        `json:"failures"`
	Latency            time.Duration `json:"latency_ewma_ns"`
	Breaker            string        `json:"breaker"`
	// Remaining is BalanceTotal less what is used; -1 when unknown.
	Remaining float64 `json:"remaining"`
	Spent     float64 `json:"spent"`
	// Refusals counts the ambiguous refusals ([Refused]) since the key's
	// last success, toward Service.ConfirmRefusals.
	Refusals int `json:"refusals,omitempty"`
	// Held reports whether the key's breaker tripped beyond the service's
	// ejection cap and the key was kept in rotation.
	Held bool `json:"held,omitempty"`
	// Features is the use of each rate-limited feature of the key
	// ([Key.Features]); nil when it has none.
	Features map[string]FeatureUse `json:"features,omitempty"`
}

// FeatureUse is one feature's requests-per-minute budget on a key. The
// budget is a bucket of RPM leases (or Service.RateBurst) refilled at RPM
// a minute: Used is the leases the bucket is short of full, which is the
// leases of the trailing minute when they came in one burst, and fewer as
// the bucket refills; Available is what may be leased now.
type FeatureUse struct {
	RPM       int `json:"rpm"`
	Used      int `json:"used"`
	Available int `json:"available"`
}

// Stats returns a snapshot of every key of a service, in load order.
func (p *Pool) Stats(service string) ([]KeyStats, bool) {
	s := (*p.services.Load())[service]
	if s == nil {
		return nil, false
	}
	now := p.now()
	s.mu.Lock()
	s.wake(now)
	out := make([]KeyStats, 0, len(s.all))
	for _, c := range s.all {
		st := KeyStats{
			ID: c.key.ID, Service: s.name, Hint: c.key.Secret.Hint(),
			State: c.state, Reason: c.reason, Until: c.until,
			InFlight: c.inFlight.Load(), RequestsLastMinute: c.lastMinute(now),
			Requests: c.requests, Failures: c.failures,
			Latency: time.Duration(c.ewma.Load()), Breaker: "closed",
			Remaining: c.remaining(), Spent: c.spent,
			Refusals: c.strikes, Held: c.held,
		}
		if math.IsInf(st.Remaining, 1) {
			st.Remaining = -1
		}
		st.Features = featureUse(c, s.cfg.Load().RateBurst, now)
		if b := c.brk.Load(); b != nil {
			st.Breaker = b.State().String()
		}
		out = append(out, st)
	}
	events := s.takeEvents()
	s.mu.Unlock()
	p.emit(events)
	return out, true
}

// featureUse returns the use of c's rate-limited features at now; the
// caller holds the service's lock.
func featureUse(c *keyState, burst int, now time.Time) map[string]FeatureUse {
	var out map[string]FeatureUse
	for f, rpm := range c.key.Features {
		if rpm <= 0 {
			continue
		}
		if out == nil {
			out = make(map[string]FeatureUse, len(c.key.Features))
		}
		full := rateBurst(rpm, burst)
		u := FeatureUse{RPM: rpm, Available: full}
		if l := c.featLim[f]; l != nil {
			u.Available = min(full, max(0, int(math.Floor(l.TokensAt(now)))))
		}
		u.Used = full - u.Available
		out[f] = u
	}
	return out
}

func (c *keyState) observeLatency(d time.Duration) {
	if d <= 0 {
		d = 1
	}
	for {
		old := c.ewma.Load()
		nv := int64(d)
		if old != 0 {
			nv = old + (int64(d)-old)/5
		}
		if c.ewma.CompareAndSwap(old, nv) {
			return
		}
	}
}

const bucketWidth = 5 * time.Second

func (c *keyState) countRequest(now time.Time) {
	c.requests++
	slot := now.UnixNano() / int64(bucketWidth)
	c.advance(slot)
	c.buckets[slot%12]++
}

func (c *keyState) advance(slot int64) {
	if slot-c.bucketBase >= 12 {
		if slot-c.bucketBase >= 24 {
			c.buckets = [12]uint32{}
		} else {
			for i := c.bucketBase + 12; i <= slot; i++ {
				c.buckets[i%12] = 0
			}
		}
		c.bucketBase = slot - 11
	}
}

func (c *keyState) lastMinute(now time.Time) int {
	slot := now.UnixNano() / int64(bucketWidth)
	c.advance(slot)
	n := 0
	for i := slot - 11; i <= slot; i++ {
		if i >= c.bucketBase {
			n += int(c.buckets[i%12])
		}
	}
	return n
}
