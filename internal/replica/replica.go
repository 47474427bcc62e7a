// Package replica holds what keypoold's replicas use to talk to each
// other over Redis pub/sub: an id that marks a process's own messages,
// and a receive loop.
package replica

import (
	"context"
	"crypto/rand"
	"encoding/hex"

	"github.com/redis/go-redis/v9"
)

// NewID returns a random id that marks this process's messages on the
// replicas' channels, so that a replica skips its own.
func NewID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// Receive hands each payload published on an already subscribed ps to fn
// until ctx ends or the subscription closes, then closes ps. go-redis
// re-subscribes by itself after a lost connection.
func Receive(ctx context.Context, ps *redis.PubSub, fn func(payload string)) {
	defer ps.Close()
	ch := ps.Channel()
	for {
		select {
		case <-ctx.Done():
			return
		case m, ok := <-ch:
			if !ok {
				return
			}
			fn(m.Payload)
		}
	}
}
