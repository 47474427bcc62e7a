package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"

	"github.com/redis/go-redis/v9"
)

// newReplicaID returns a random id that marks this process's messages on
// the replicas' channels, so that a replica skips its own.
func newReplicaID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// receive hands each payload published on an already subscribed ps to fn
// until ctx ends or the subscription closes, then closes ps. go-redis
// re-subscribes by itself after a lost connection.
func receive(ctx context.Context, ps *redis.PubSub, fn func(payload string)) {
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
