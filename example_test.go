package keypool_test

import (
	"errors"
	"fmt"
	"time"

	"github.com/keypool/keypool"
)

// A pool routes around a key the upstream rate-limited, and says when to
// come back once no key can serve.
func Example() {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	pool, _ := keypool.New(keypool.Config{Now: func() time.Time { return now }})
	_ = pool.SetService(keypool.Service{Name: "openai", BaseURL: "https://api.openai.com", Auth: keypool.Bearer},
		[]keypool.Key{{ID: "a", Secret: "sk-aaaaaaaaaaaaaaaa"}, {ID: "b", Secret: "sk-bbbbbbbbbbbbbbbb"}})

	lease, _ := pool.Acquire("openai", keypool.Request{})
	fmt.Println("first request uses", lease.KeyID(), lease.Secret())
	lease.Release(keypool.Outcome{Kind: keypool.RateLimited, RetryAfter: 30 * time.Second})

	for i := 0; i < 2; i++ {
		lease, _ = pool.Acquire("openai", keypool.Request{})
		fmt.Println("next request uses", lease.KeyID())
		lease.Release(keypool.Outcome{Kind: keypool.OK})
	}

	lease, _ = pool.Acquire("openai", keypool.Request{})
	lease.Release(keypool.Outcome{Kind: keypool.Invalid, Reason: "401"})
	_, err := pool.Acquire("openai", keypool.Request{})
	var nk *keypool.NoKeyError
	if errors.As(err, &nk) {
		fmt.Println("no key; retry after about", nk.RetryAfter.Truncate(10*time.Second)) // 30 s plus jitter
	}
	// Output:
	// first request uses a [redacted]
	// next request uses b
	// next request uses b
	// no key; retry after about 30s
}
