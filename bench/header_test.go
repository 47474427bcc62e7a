package main

import (
	"strings"
	"testing"
	"time"
)

func TestHeader(t *testing.T) {
	conns := []int{1, 64}
	streams := header("streams", 8, conns, 4*time.Second, 3, 512, 3, false, "info")
	if strings.Contains(streams, "per measurement") || strings.Contains(streams, "rounds") || !strings.Contains(streams, "512 concurrent SSE streams, 3 waves") {
		t.Errorf("streams header: %q", streams)
	}
	tp := header("throughput", 8, conns, 4*time.Second, 3, 512, 3, true, "info")
	if !strings.Contains(tp, "1,64 connection(s), 4s per measurement, 3 rounds") || strings.Contains(tp, "SSE") || !strings.Contains(tp, "metering") {
		t.Errorf("throughput header: %q", tp)
	}
	all := header("all", 8, conns, 4*time.Second, 3, 512, 3, false, "warn")
	if !strings.Contains(all, "per measurement") || !strings.Contains(all, "SSE streams") || !strings.Contains(all, "log level warn") {
		t.Errorf("all header: %q", all)
	}
	for _, m := range []string{"throughput", "streams", "all"} {
		if !validMode(m) {
			t.Errorf("mode %q rejected", m)
		}
	}
	if validMode("stream") {
		t.Error(`mode "stream" accepted`)
	}
}
