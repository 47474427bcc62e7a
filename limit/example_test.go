package limit_test

import (
	"context"
	"fmt"
	"time"

	"github.com/keypool/keypool/limit"
)

func Example() {
	l, _ := limit.NewLocal(limit.LocalConfig{})
	defer l.Close()
	ctx := context.Background()
	now := time.Date(2025, 3, 10, 23, 59, 0, 0, time.UTC)

	// rpm_limit: 2
	for range 3 {
		d, _ := l.Allow(ctx, "team:eng", 2, now)
		fmt.Println("allow:", d.Allowed, d.RetryAfter)
	}

	// daily_token_limit: 1000, reserved at the request's max_tokens.
	daily := []limit.Limit{{Window: limit.Day, Warn: 800, Block: 1000}}
	r, d, _ := l.Reserve(ctx, "team:eng", 900, daily, now)
	fmt.Println("reserve 900:", d.Allowed, d.Warn)
	_, d, _ = l.Reserve(ctx, "team:eng", 200, daily, now)
	fmt.Println("reserve 200:", d.Allowed, d.Limit.Window, d.RetryAfter)
	l.Settle(ctx, r, 950, now) // the response used 950 tokens
	used, _ := l.Usage(ctx, "team:eng", limit.Day, now)
	fmt.Println("used today:", used)

	_, d, _ = l.Reserve(ctx, "team:eng", 200, daily, now.Add(time.Minute))
	fmt.Println("next day:", d.Allowed)
	// Output:
	// allow: true 0s
	// allow: true 0s
	// allow: false 1m0s
	// reserve 900: true true
	// reserve 200: false day 1m0s
	// used today: 950
	// next day: true
}
