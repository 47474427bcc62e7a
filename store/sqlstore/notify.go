package sqlstore

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/keypool/keypool/store"
)

// NotifyChannel is the PostgreSQL channel that every write to services and
// keys notifies, in the transaction that bumps [Store.Version], so a
// listener hears of a change only once it is committed. The payload is
// empty.
const NotifyChannel = "keypool_changes"

// AuthChannel is the PostgreSQL channel on which replicas tell each other
// that a token, team or user changed (see [Store.NotifyAuth]), so each
// drops it from its auth cache at once. Payloads are opaque to the store
// (ids, never secrets).
const AuthChannel = "keypool_auth"

// Listen backoff bounds.
const (
	listenMinBackoff = 100 * time.Millisecond
	listenMaxBackoff = 10 * time.Second
)

// Listen calls fn each time a service or key changes, through any Store on
// the same PostgreSQL database (LISTEN on [NotifyChannel]), until ctx is
// done; it then returns ctx.Err(). It holds one dedicated connection,
// outside the Store's pool, and when that connection fails it reconnects
// with capped exponential backoff, logging the outage once and the
// recovery once. fn is also called each time listening (re)starts, since a
// change may have been missed while it was not; fn runs on Listen's
// goroutine and should not block (store.Syncer.Trigger does not).
//
// On SQLite there are no notifications: Listen returns an error wrapping
// [errors.ErrUnsupported] at once.
func (s *Store) Listen(ctx context.Context, fn func()) error {
	return s.listen(ctx, NotifyChannel, func(string) { fn() }, fn)
}

// ListenAuth calls fn with the payload of each [Store.NotifyAuth] sent
// through any Store on the same PostgreSQL database, until ctx is done,
// reconnecting as [Store.Listen] does; fn("") is called each time
// listening (re)starts, since a notification may have been missed. On
// SQLite it returns an error wrapping [errors.ErrUnsupported] at once.
func (s *Store) ListenAuth(ctx context.Context, fn func(payload string)) error {
	return s.listen(ctx, AuthChannel, fn, func() { fn("") })
}

// NotifyAuth sends payload on [AuthChannel] to every [Store.ListenAuth]
// on the same PostgreSQL database (this Store's included). On SQLite it
// returns an error wrapping [errors.ErrUnsupported].
func (s *Store) NotifyAuth(ctx context.Context, payload string) error {
	if s.kind != kindPostgres {
		return fmt.Errorf("sqlstore: notify: %w: notifications need PostgreSQL", errors.ErrUnsupported)
	}
	if err := s.w.WithContext(ctx).Exec("SELECT pg_notify(?, ?)", AuthChannel, payload).Error; err != nil {
		return mapErr("notify", err)
	}
	return nil
}

func (s *Store) listen(ctx context.Context, channel string, fn func(string), started func()) error {
	if s.kind != kindPostgres {
		return fmt.Errorf("sqlstore: listen: %w: change notifications need PostgreSQL", errors.ErrUnsupported)
	}
	cfg, err := pgx.ParseConfig(s.dsn)
	if err != nil {
		return fmt.Errorf("sqlstore: listen: %w", redactURLError(err))
	}
	backoff := listenMinBackoff
	var down time.Time
	for {
		err := s.listenOnce(ctx, cfg, channel, fn, started, func() {
			backoff = listenMinBackoff
			if !down.IsZero() {
				s.log.InfoContext(ctx, "sqlstore: listening for changes again", "down_for", time.Since(down).Round(time.Millisecond))
				down = time.Time{}
			}
		})
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if down.IsZero() {
			down = time.Now()
			s.log.WarnContext(ctx, "sqlstore: change notification connection failed; reconnecting with backoff", "err", err)
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
		backoff = min(2*backoff, listenMaxBackoff)
	}
}

// listenOnce connects, listens on channel and calls fn per notification
// until the connection fails or ctx ends. up and started are called once
// listening has started.
func (s *Store) listenOnce(ctx context.Context, cfg *pgx.ConnConfig, channel string, fn func(string), started, up func()) error {
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return err
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = conn.Close(cctx)
	}()
	if _, err := conn.Exec(ctx, "LISTEN "+channel); err != nil {
		return err
	}
	up()
	started()
	for {
		n, err := conn.WaitForNotification(ctx)
		if err != nil {
			return err
		}
		fn(n.Payload)
	}
}

var _ store.Listener = (*Store)(nil)
