package auth_test

import (
	"fmt"
	"time"

	"github.com/keypool/keypool/auth"
)

func ExampleFailureLimiter() {
	l := auth.NewFailureLimiter(auth.FailureConfig{Max: 2, Window: time.Minute})
	t0 := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	l.Fail("203.0.113.7", t0)
	l.Fail("203.0.113.7", t0)
	wait, ok := l.Check("203.0.113.7", t0.Add(15*time.Second))
	fmt.Println(ok, wait)
	_, ok = l.Check("203.0.113.7", t0.Add(time.Minute))
	fmt.Println(ok)
	// Output:
	// false 45s
	// true
}

func ExampleNewToken() {
	token, prefix, hash, err := auth.NewToken()
	if err != nil {
		panic(err)
	}
	fmt.Println(len(token), token[:3], prefix == token[:8], len(hash))
	// Output: 46 kp_ true 32
}
