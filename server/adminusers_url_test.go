package server

import "testing"

// The first start's banner names the address a person opens, not a
// placeholder.
func TestConsoleURL(t *testing.T) {
	for _, c := range []struct{ listen, want string }{
		{"", "http://localhost:8080/"},
		{":8080", "http://localhost:8080/"},
		{"0.0.0.0:9000", "http://localhost:9000/"},
		{"[::]:9000", "http://localhost:9000/"},
		{"127.0.0.1:18080", "http://127.0.0.1:18080/"},
		{"[::1]:8080", "http://[::1]:8080/"},
		{"keypool.internal:80", "http://keypool.internal:80/"},
	} {
		if got := consoleURL(c.listen); got != c.want {
			t.Errorf("consoleURL(%q) = %q, want %q", c.listen, got, c.want)
		}
	}
}
