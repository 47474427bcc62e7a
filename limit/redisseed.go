package limit

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// ErrUnseeded is returned by [Redis.ClaimSeed] when another replica is
// seeding the counters.
var ErrUnseeded = errors.New("limit: redis counters are being seeded by another replica")

// seedLockTTL bounds how long a replica that died while seeding holds the
// seed lock.
const seedLockTTL = time.Minute

func (r *Redis) epochKey() string { return r.cfg.Prefix + "epoch" }
func (r *Redis) lockKey() string  { return r.cfg.Prefix + "seedlock" }

// claimScript takes the seed lock (KEYS[2]) for this replica (ARGV[1])
// unless Redis is seeded (KEYS[1]); a replica retrying a failed seed
// takes its own lock again.
var claimScript = redis.NewScript(`
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return 1
end
return 2
`)

var seededScript = redis.NewScript(`
redis.call('SET', KEYS[1], ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
`)

// ClaimSeed reports whether the counters on Redis must be seeded from the
// usage records by this replica: Redis holds no epoch key (it is new,
// was flushed or restarted empty) and this replica took the seed lock, so
// replicas seed once. When it returns true, the caller charges the
// records' usage (with [Redis.SettleAll]) and then calls done, which marks
// Redis seeded and releases the lock; a replica whose seed failed claims
// its own lock again at once. It returns [ErrUnseeded] while another
// replica holds the lock, and an error wrapping [ErrUnavailable] when
// Redis cannot be reached.
func (r *Redis) ClaimSeed(ctx context.Context) (seed bool, done func(context.Context) error, err error) {
	token := strconv.FormatUint(r.idBase, 36) // this replica's: a failed seed is retried at once
	var n int64
	err = r.run(ctx, "seed", func(cctx context.Context) error {
		var err error
		n, err = claimScript.Run(cctx, r.c, []string{r.epochKey(), r.lockKey()}, token, seedLockTTL.Milliseconds()).Int64()
		return err
	})
	switch {
	case err != nil:
		return false, nil, err
	case n == 0:
		return false, nil, nil
	case n == 2:
		return false, nil, ErrUnseeded
	}
	return true, func(ctx context.Context) error {
		return r.run(ctx, "seed", func(cctx context.Context) error {
			return seededScript.Run(cctx, r.c, []string{r.epochKey(), r.lockKey()}, token,
				strconv.FormatInt(time.Now().UnixMilli(), 10)).Err()
		})
	}, nil
}

// seedWaiter lets the calls that find Redis unseeded wait together for
// the seed: one goroutine polls the epoch key for all of them.
type seedWaiter struct {
	mu    sync.Mutex // protects round
	round *seedRound
}

type seedRound struct {
	done chan struct{}
	ok   bool // Redis holds the epoch key; set before done is closed
}

// seedPoll is how often the waiting calls' poller reads the epoch key.
const seedPoll = 10 * time.Millisecond

// awaitSeed waits, at most SeedWait, until Redis holds the epoch key,
// and reports whether it does.
func (r *Redis) awaitSeed(ctx context.Context) bool {
	r.seed.mu.Lock()
	rd := r.seed.round
	if rd == nil {
		rd = &seedRound{done: make(chan struct{})}
		r.seed.round = rd
		go r.pollSeed(rd)
	}
	r.seed.mu.Unlock()
	select {
	case <-rd.done:
		return rd.ok
	case <-ctx.Done():
		return false
	}
}

func (r *Redis) pollSeed(rd *seedRound) {
	defer func() {
		r.seed.mu.Lock()
		r.seed.round = nil
		r.seed.mu.Unlock()
		close(rd.done)
	}()
	t := time.NewTicker(seedPoll)
	defer t.Stop()
	for deadline := time.Now().Add(r.cfg.SeedWait); time.Now().Before(deadline); {
		if seeded, err := r.seeded(); err == nil && seeded {
			rd.ok = true
			return
		}
		select {
		case <-r.ctx.Done():
			return
		case <-t.C:
		}
	}
}

// seeded reports whether Redis holds the epoch key.
func (r *Redis) seeded() (bool, error) {
	var n int64
	err := r.run(r.ctx, "seed", func(cctx context.Context) error {
		var err error
		n, err = r.c.Exists(cctx, r.epochKey()).Result()
		return err
	})
	return n == 1, err
}
