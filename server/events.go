package server

import (
	"context"
	"errors"
	"strings"
	"time"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/store"
	"github.com/keypool/keypool/store/external"
)

// onEvent is the pool's OnEvent hook. It runs on the request path, so it
// only counts and queues: the store is written by persistEvents.
func (s *Server) onEvent(e keypool.Event) {
	if e.Remote {
		// Applied from another replica: that replica counted, shared and
		// persisted it; sharing it again would echo it back.
		return
	}
	s.metrics.onEvent(e)
	if s.share != nil {
		s.share.offer(e)
	}
	if !persistent(e) {
		return
	}
	select {
	case s.events <- e:
	default:
		s.metrics.eventsDropped.Inc()
		s.log.Warn("key state change not persisted: queue full", "service", e.Service, "key_id", e.KeyID, "state", e.State.String())
	}
}

// onHold is the pool's OnHold hook: a key kept in rotation against the
// evidence (the min_active_keys floor, the max_ejection_percent cap) is
// logged and counted.
func (s *Server) onHold(h keypool.Hold) {
	s.metrics.holds.WithLabelValues(h.Service, h.Kind).Inc()
	s.log.Warn("key kept in rotation", "service", h.Service, "key_id", h.KeyID, "kind", h.Kind, "reason", h.Reason)
}

// persistent reports whether a state change must survive a restart: a key
// found invalid, or exhausted with no known reset. Transient states
// (cooling, breaker open) live in the pool only. Keys of an external
// credential table are read only: their owner decides.
func persistent(e keypool.Event) bool {
	if strings.HasPrefix(e.KeyID, external.KeyIDPrefix) {
		return false
	}
	return e.State == keypool.StateInvalid || (e.State == keypool.StateExhausted && e.Until.IsZero())
}

// persistEvents writes queued key state changes to the store until ctx
// ends, then writes whatever is still queued.
func (s *Server) persistEvents(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case e := <-s.events:
			s.persist(ctx, e)
		}
	}
}

// drainEvents writes the events still queued (at shutdown).
func (s *Server) drainEvents(ctx context.Context) {
	for {
		select {
		case e := <-s.events:
			s.persist(ctx, e)
		default:
			return
		}
	}
}

func (s *Server) persist(ctx context.Context, e keypool.Event) {
	status := store.StatusInvalid
	if e.State == keypool.StateExhausted {
		status = store.StatusExhausted
	}
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	err := s.st.SetKeyStatus(wctx, e.KeyID, status, e.Reason)
	switch {
	case err == nil:
		s.log.Info("key status persisted", "service", e.Service, "key_id", e.KeyID, "status", status, "reason", e.Reason)
	case errors.Is(err, store.ErrNotFound):
	default:
		s.log.Warn("persisting key status failed", "service", e.Service, "key_id", e.KeyID, "status", status, "err", err)
	}
}

// chargeKey deducts a finished request's metered spend from the serving
// key's balance, in the key's balance unit: USD for "usd", tokens for
// "tokens", one per successful request for "requests", and returns it.
// The pool learns it at once (a spent key turns exhausted); the store
// gets it with the request's usage record (its KeySpend), in the same
// transaction as the record and only once per record, so balance_used
// follows the records, also after a crash and a journal replay.
func (s *Server) chargeKey(service, keyID, unit string, status int, tokens, cost float64) float64 {
	var amt float64
	switch strings.ToLower(unit) {
	case "usd", "$", "dollars":
		amt = cost
	case "tokens", "token":
		amt = tokens
	case "requests", "request", "calls":
		if status >= 200 && status < 300 {
			amt = 1
		}
	}
	if amt <= 0 {
		return 0
	}
	s.pool.Spend(service, keyID, amt)
	return amt
}
