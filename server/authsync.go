package server

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/keypool/keypool/auth"
	"github.com/keypool/keypool/internal/replica"
)

// authChannel is the Redis pub/sub channel of auth invalidations, beside
// PostgreSQL's [sqlstore.AuthChannel].
const authChannel = "keypool:auth"

// authMsg is one invalidation as sent to the other replicas: a scope
// (token, team, user, all) and an id. Never a secret.
type authMsg struct {
	Replica string `json:"r"`
	Scope   string `json:"s"`
	ID      string `json:"i,omitempty"`
}

// authSync carries auth cache invalidations between replicas: a token,
// team or user changed through one replica is dropped from every
// replica's auth cache (and its open streams re-checked) within
// milliseconds, through PostgreSQL NOTIFY and, when configured, Redis
// pub/sub (both are used; an invalidation received twice is harmless).
// With both down, the auth cache's TTL bounds the delay (at most 5 s by
// default).
type authSync struct {
	st   authNotifier  // nil: the store carries no invalidations
	rdb  *redis.Client // nil without Redis
	auth *auth.Authenticator
	log  *slog.Logger
	id   string
	out  chan authMsg

	mu       sync.Mutex           // protects incoming
	incoming map[authMsg]struct{} // being applied from another replica: not re-sent
}

// authNotifier carries auth invalidations through the store (sqlstore's
// PostgreSQL NOTIFY; on SQLite both calls report errors.ErrUnsupported).
type authNotifier interface {
	NotifyAuth(ctx context.Context, payload string) error
	ListenAuth(ctx context.Context, fn func(payload string)) error
}

func newAuthSync(st authNotifier, rdb *redis.Client, log *slog.Logger) *authSync {
	return &authSync{st: st, rdb: rdb, log: log, id: replica.NewID(), out: make(chan authMsg, 1024),
		incoming: map[authMsg]struct{}{}}
}

// offer queues a local invalidation for the other replicas, unless it is
// one received from them. It does not block.
func (a *authSync) offer(scope, id string) {
	m := authMsg{Scope: scope, ID: id}
	a.mu.Lock()
	_, in := a.incoming[m]
	a.mu.Unlock()
	if in {
		return
	}
	m.Replica = a.id
	select {
	case a.out <- m:
	default:
		a.log.Warn("auth invalidation queue full; other replicas see the change within the auth cache TTL", "scope", scope)
	}
}

// send delivers queued invalidations until ctx ends.
func (a *authSync) send(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case m := <-a.out:
			b, _ := json.Marshal(m)
			cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			perr := errors.ErrUnsupported
			if a.st != nil {
				perr = a.st.NotifyAuth(cctx, string(b))
			}
			var rerr error
			if a.rdb != nil {
				rerr = a.rdb.Publish(cctx, authChannel, b).Err()
			}
			cancel()
			if (perr != nil && !errors.Is(perr, errors.ErrUnsupported)) && (a.rdb == nil || rerr != nil) && ctx.Err() == nil {
				a.log.Warn("cannot tell other replicas of an auth change; they see it within the auth cache TTL",
					"scope", m.Scope, "postgres_err", perr, "redis_err", rerr)
			}
		}
	}
}

// apply invalidates what another replica announced.
func (a *authSync) apply(payload string) {
	if payload == "" {
		return
	}
	var m authMsg
	if err := json.Unmarshal([]byte(payload), &m); err != nil || m.Replica == a.id {
		return
	}
	m.Replica = ""
	a.mu.Lock()
	a.incoming[m] = struct{}{}
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		delete(a.incoming, m)
		a.mu.Unlock()
	}()
	switch m.Scope {
	case "token":
		a.auth.Invalidate(m.ID)
	case "team":
		a.auth.InvalidateTeam(m.ID)
	case "user":
		a.auth.InvalidateUser(m.ID)
	case "all":
		a.auth.Purge()
	}
}

// listenPostgres applies invalidations from PostgreSQL until ctx ends (at
// once on SQLite, which has no notifications).
func (a *authSync) listenPostgres(ctx context.Context) {
	if a.st != nil {
		_ = a.st.ListenAuth(ctx, a.apply)
	}
}

// listenRedis applies invalidations from Redis pub/sub until ctx ends.
func (a *authSync) listenRedis(ctx context.Context) {
	replica.Receive(ctx, a.rdb.Subscribe(ctx, authChannel), a.apply)
}
