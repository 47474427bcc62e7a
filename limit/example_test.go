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
	// A request is admitted while settled usage plus the reservations in
	// flight is below the block threshold, even if its estimate is larger.
	r, d, _ := l.Reserve(ctx, "team:eng", 1200, daily, now)
	fmt.Println("reserve 1200:", d.Allowed, d.Warn)
	_, d, _ = l.Reserve(ctx, "team:eng", 200, daily, now) // 1200 in flight
	fmt.Println("reserve 200:", d.Allowed, d.Reserved, d.RetryAfter)
	l.Settle(ctx, r, 950, now) // the response used 950 tokens
	used, _ := l.Usage(ctx, "team:eng", limit.Day, now)
	fmt.Println("used today:", used)
	r, d, _ = l.Reserve(ctx, "team:eng", 200, daily, now) // 950 < 1000: fits
	fmt.Println("reserve 200:", d.Allowed)
	l.Settle(ctx, r, 100, now)
	_, d, _ = l.Reserve(ctx, "team:eng", 1, daily, now) // 1050: spent
	fmt.Println("reserve 1:", d.Allowed, d.Used, d.Limit.Window, d.RetryAfter)

	_, d, _ = l.Reserve(ctx, "team:eng", 200, daily, now.Add(time.Minute))
	fmt.Println("next day:", d.Allowed)
	// Output:
	// allow: true 0s
	// allow: true 0s
	// allow: false 1m0s
	// reserve 1200: true true
	// reserve 200: false 1200 1m0s
	// used today: 950
	// reserve 200: true
	// reserve 1: false 1050 day 1m0s
	// next day: true
}
