package keystate

import (
	"context"
	"encoding/json"
	"log/slog"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/internal/replica"
)

// shareChannel is the Redis pub/sub channel on which replicas tell each
// other what they learned about keys; shareState is a hash of the timed
// states still in force (cooling, open, exhausted until a reset), read by
// a replica when it starts.
const (
	shareChannel = "keypool:key-events"
	shareState   = "keypool:key-state"
)

// sharedEvent is one key state change as published.
type sharedEvent struct {
	Replica string        `json:"replica"`
	Event   keypool.Event `json:"event"`
}

// sharer shares key state changes between replicas through Redis: a key
// that one replica saw rate-limited, failing, revoked or spent is routed
// around by every replica at once, instead of each finding out with a
// failed request of its own. Half-open probing stays local (each replica
// probes with its own traffic). Events carry key ids and states, never
// secrets. A replica that starts later reads the timed states still in
// force from a Redis hash; invalid and spent keys come from the store.
type sharer struct {
	rdb  *redis.Client
	pool *keypool.Pool
	log  *slog.Logger
	id   string
	out  chan keypool.Event
}

func newSharer(rdb *redis.Client, pool *keypool.Pool, log *slog.Logger) *sharer {
	return &sharer{rdb: rdb, pool: pool, log: log, id: replica.NewID(), out: make(chan keypool.Event, 1024)}
}

// offer queues an event for publishing without blocking the request path.
func (sh *sharer) offer(e keypool.Event) {
	if e.State == keypool.StateHalfOpen {
		return
	}
	select {
	case sh.out <- e:
	default: // the other replicas find out with a request of their own
	}
}

// publish sends queued events until ctx ends.
func (sh *sharer) publish(ctx context.Context) {
	down := false
	for {
		select {
		case <-ctx.Done():
			return
		case e := <-sh.out:
			msg, _ := json.Marshal(sharedEvent{Replica: sh.id, Event: e})
			field := e.Service + "\x00" + e.KeyID
			_, err := sh.rdb.TxPipelined(ctx, func(p redis.Pipeliner) error {
				p.Publish(ctx, shareChannel, msg)
				if e.Until.IsZero() {
					p.HDel(ctx, shareState, field)
				} else {
					p.HSet(ctx, shareState, field, msg)
				}
				return nil
			})
			switch {
			case err != nil && ctx.Err() == nil && !down:
				down = true
				sh.log.Warn("cannot share key state with other replicas: redis unreachable", "error", err.Error())
			case err == nil && down:
				down = false
				sh.log.Info("sharing key state with other replicas again")
			}
		}
	}
}

// subscribe applies other replicas' events until ctx ends.
func (sh *sharer) subscribe(ctx context.Context, ready chan<- struct{}) {
	ps := sh.rdb.Subscribe(ctx, shareChannel)
	// Bounded: a Redis that accepts connections and never answers must
	// not hold up start-up (go-redis keeps trying in the background).
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	if _, err := ps.Receive(rctx); err != nil && ctx.Err() == nil {
		sh.log.Warn("cannot subscribe to other replicas' key state yet", "error", err.Error())
	}
	cancel()
	sh.catchUp(ctx)
	close(ready)
	replica.Receive(ctx, ps, sh.apply)
}

// apply applies one event published by another replica.
func (sh *sharer) apply(payload string) {
	var se sharedEvent
	if err := json.Unmarshal([]byte(payload), &se); err != nil || se.Replica == sh.id {
		return
	}
	sh.pool.Apply(se.Event)
}

// catchUp applies the timed states other replicas recorded before this
// one subscribed.
func (sh *sharer) catchUp(ctx context.Context) {
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	all, err := sh.rdb.HGetAll(rctx, shareState).Result()
	if err != nil {
		return
	}
	now := sh.pool.Now()
	for _, v := range all {
		var se sharedEvent
		if json.Unmarshal([]byte(v), &se) != nil || !se.Event.Until.After(now) {
			continue // over; the hash holds one field per key, so it stays small
		}
		sh.pool.Apply(se.Event)
	}
}
