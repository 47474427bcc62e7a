package main

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/keypool/keypool/store/storetest"
)

// TestReplicas is the replica suite of -mode replicas at CI size
// ([ciReplConfig]: the same scenarios, the same bounds, a 10 s rpm run
// and a 5 s Redis outage): 3 keypoold processes on a scratch PostgreSQL
// database (KEYPOOL_TEST_POSTGRES) and a private redis-server. Each
// figure that misses its bound fails the test. About 50 s with the build.
func TestReplicas(t *testing.T) {
	if testing.Short() {
		t.Skip("starts 3 keypoold processes")
	}
	dsn := storetest.PostgresDSN(t)
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Skip("redis-server not installed")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	dir := t.TempDir()
	bin := os.Getenv("KEYPOOL_FAULTS_BIN")
	if bin == "" {
		var err error
		if bin, err = buildKeypoold(ctx, dir); err != nil {
			t.Fatal(err)
		}
	}
	c, err := startCluster(ctx, bin, dir, dsn, 3)
	if err != nil {
		t.Fatal(err)
	}
	defer c.close()
	rep := &replReport{out: testWriter{t}}
	if err := runReplicaScenarios(ctx, c, ciReplConfig(), replScenarios, rep); err != nil {
		t.Fatal(err)
	}
	for _, ch := range rep.checks {
		if !ch.ok {
			t.Errorf("%s: %s", ch.name, ch.figure)
		}
	}
}

// testWriter writes the suite's table to the test log, a line per Log.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}
