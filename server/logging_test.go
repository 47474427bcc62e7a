package server

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

// TestLogsWriteDurationsAsText: a time.Duration in a log line reads "5s"
// in both formats, never 5000000000 (nanoseconds, slog's JSON default).
func TestLogsWriteDurationsAsText(t *testing.T) {
	for _, format := range []string{"json", "text"} {
		var buf bytes.Buffer
		log, err := newLogger(Config{LogFormat: format, LogLevel: "info"}, &buf)
		if err != nil {
			t.Fatal(err)
		}
		log.Info("store: source reachable again", "down_for", 5*time.Second)
		if out := buf.String(); strings.Contains(out, "5000000000") || !strings.Contains(out, "5s") {
			t.Errorf("%s: %s", format, out)
		}
	}
}
