package limit

import (
	"context"
	"net"
	"testing"
	"time"
)

// A call to a Redis that is down learns it from the refused dial at once:
// go-redis's default retry back-off (10 ms to 1 s, three retries) made
// each such call ~100 ms, which the breaker's probe and the calls waiting
// for it paid once per open period.
func TestRedisClientFailsFastWhenRedisIsDown(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens there now: every dial is refused

	c, err := NewRedisClient("redis://" + addr + "/0")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got := c.Options().MinRetryBackoff; got != 0 {
		t.Errorf("retry back-off %s, want none", got)
	}
	const calls = 10
	start := time.Now()
	for range calls {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		if err := c.Ping(ctx).Err(); err == nil {
			t.Fatal("PING to a closed port answered")
		}
		cancel()
	}
	// With the default back-off the ten calls take ~1 s.
	if took := time.Since(start); took > 400*time.Millisecond {
		t.Errorf("%d calls to a down Redis took %s, want well under 1 s", calls, took)
	}
	t.Logf("%d calls to a down Redis took %s", calls, time.Since(start))

	withBackoff, err := NewRedisClient("redis://" + addr + "/0?min_retry_backoff=20ms")
	if err != nil {
		t.Fatal(err)
	}
	defer withBackoff.Close()
	if got := withBackoff.Options().MinRetryBackoff; got != 20*time.Millisecond {
		t.Errorf("min_retry_backoff=20ms in the URL gave %s", got)
	}
}
