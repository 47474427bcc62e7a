package limit

import (
	"context"
	"math"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// heartbeatEvery is how often a [Redis] with FailLocalBudget records that
// its replica is alive; replicaTTL is how long a replica counts as live
// after its last heartbeat.
const (
	heartbeatEvery = time.Second
	replicaTTL     = 5 * time.Second
)

// localShare is the budget fail policy "local" of a [Redis]
// (FailLocalBudget). While Redis answers, it remembers, per counter key,
// the room left under the key's tightest block at the last decision this
// replica got from Redis, and the number of live replicas (a heartbeat
// sorted set on Redis: each replica adds itself every second; replicas
// seen within the last 5 s count). While Redis is unreachable, a counter's
// share is room / replicas, fixed at its first use in the outage, and the
// replica admits on it with the rule of [Limit]: while what it admitted
// locally (estimates, replaced by the actuals as requests settle) is
// below the share. A counter this replica has no decision for is refused
// (fail closed). The shares are forgotten when Redis answers again; the
// settlements of requests admitted locally are queued and replayed on
// Redis, idempotently, when it is back.
//
// So across N replicas, the requests admitted on a counter during an
// outage spend at most
//
//	R + D + N × a_max
//
// where R is the room left at the outage's start, D what the replicas
// admitted on the counter after the oldest of their last decisions (0 when
// every replica had a request on it just before the outage), and a_max
// the largest actual amount of one request (each replica's last
// admission may cross its share). A replica starting during the outage
// has no decision and refuses; a replica dead for less than 5 s still
// counts, which only shrinks the shares.
type localShare struct {
	mu       sync.Mutex // protects room and out
	room     map[string]float64
	out      map[string]*localOut
	replicas atomic.Int64
}

// localOut is one counter's share during an outage and what this replica
// admitted on it.
type localOut struct{ share, used float64 }

func (l *localShare) init() {
	l.room = map[string]float64{}
	l.out = map[string]*localOut{}
	l.replicas.Store(1)
}

// seen records the room Redis reported for the charges it checked.
func (l *localShare) seen(charges []Charge, rooms []float64) {
	l.mu.Lock()
	for i, room := range rooms {
		l.room[charges[i].Key] = room
	}
	l.mu.Unlock()
}

// reset forgets the outage's shares: Redis answers again.
func (l *localShare) reset() {
	l.mu.Lock()
	clear(l.out)
	l.mu.Unlock()
}

// reserve admits charges, all or none, on the local shares; it returns
// ReserveAll's which. Decisions are Degraded; a refusal is RetryAfter 1s.
func (l *localShare) reserve(r *Redis, charges []Charge, res []Reservation, ds []Decision) int {
	n := float64(max(1, l.replicas.Load()))
	l.mu.Lock()
	defer l.mu.Unlock()
	for i, c := range charges {
		o := l.out[c.Key]
		if o == nil {
			room, ok := l.room[c.Key]
			if !ok {
				ds[i] = Decision{Degraded: true, RetryAfter: failRetry}
				return i
			}
			o = &localOut{share: room / n}
			l.out[c.Key] = o
		}
		if o.used >= o.share && !math.IsInf(o.share, 1) {
			ds[i] = Decision{Degraded: true, Used: o.used, RetryAfter: failRetry}
			return i
		}
	}
	id := strconv.FormatUint(r.newID(), 10)
	for i, c := range charges {
		o := l.out[c.Key]
		o.used += c.Amount
		res[i] = Reservation{key: c.Key, amount: c.Amount, done: new(atomic.Bool), local: true, member: id, part: i}
		ds[i] = Decision{Allowed: true, Degraded: true, Used: o.used, Reserved: c.Amount}
	}
	return -1
}

// settle replaces a local reservation's estimate by its actual in the
// outage's ledger (nothing once Redis answered again).
func (l *localShare) settle(res Reservation, actual float64) {
	l.mu.Lock()
	if o := l.out[res.key]; o != nil {
		o.used += actual - res.amount
	}
	l.mu.Unlock()
}

func (r *Redis) replicasKey() string { return r.cfg.Prefix + "replicas" }

// heartbeat records this replica as live and reads how many are, in one
// round trip.
func (r *Redis) heartbeat() {
	now := time.Now().UnixMilli()
	me := strconv.FormatUint(r.idBase, 36)
	var card *redis.IntCmd
	err := r.run(r.ctx, "heartbeat", func(ctx context.Context) error {
		_, err := r.c.TxPipelined(ctx, func(p redis.Pipeliner) error {
			p.ZAdd(ctx, r.replicasKey(), redis.Z{Score: float64(now), Member: me})
			p.ZRemRangeByScore(ctx, r.replicasKey(), "-inf", strconv.FormatInt(now-replicaTTL.Milliseconds(), 10))
			p.PExpire(ctx, r.replicasKey(), 2*replicaTTL)
			card = p.ZCard(ctx, r.replicasKey())
			return nil
		})
		return err
	})
	if err == nil {
		r.share.replicas.Store(max(1, card.Val()))
	}
}

// Replicas returns how many replicas this one counted live at its last
// heartbeat (FailLocalBudget; 1 otherwise): the divisor of the local
// shares.
func (r *Redis) Replicas() int { return int(r.share.replicas.Load()) }
