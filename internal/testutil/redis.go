package testutil

import (
	"fmt"
	"net"
	"os/exec"
	"sync"
	"testing"
	"time"
)

// StartRedis starts a private redis-server (no persistence, DEBUG
// enabled) on loopback, on port or on a free port when port is 0, for a
// test that stalls, kills or restarts Redis. It returns the server's URL
// and a function that kills it (also called when the test ends). The test
// is skipped when redis-server is not installed.
func StartRedis(t testing.TB, port int) (url string, kill func()) {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Skip("redis-server not installed")
	}
	if port == 0 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port = l.Addr().(*net.TCPAddr).Port
		l.Close()
	}
	cmd := exec.Command(bin, "--port", fmt.Sprint(port), "--bind", "127.0.0.1", "--save", "",
		"--appendonly", "no", "--enable-debug-command", "yes")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	kill = func() {
		once.Do(func() {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		})
	}
	t.Cleanup(kill)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	for deadline := time.Now().Add(5 * time.Second); ; {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("redis-server did not start")
		}
		time.Sleep(10 * time.Millisecond)
	}
	return "redis://" + addr + "/0", kill
}

// RestartRedis starts an empty redis-server (see [StartRedis]) on the
// port of url, the URL of one the test killed: Redis restarted without
// its data. It returns the new server's kill function.
func RestartRedis(t testing.TB, url string) (kill func()) {
	t.Helper()
	var port int
	if _, err := fmt.Sscanf(url, "redis://127.0.0.1:%d/0", &port); err != nil {
		t.Fatalf("testutil: not a StartRedis URL: %s", url)
	}
	_, kill = StartRedis(t, port)
	return kill
}
