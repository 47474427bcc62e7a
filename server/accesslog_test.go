package server

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"testing"
	"time"
)

// TestAccessLineMatchesSlog pins the hand-built access line to the one
// slog's JSONHandler writes for the same fields, byte for byte: strings
// that need escaping, invalid UTF-8, optional fields present and absent,
// float durations of every size.
func TestAccessLineMatchesSlog(t *testing.T) {
	at := time.Date(2026, 12, 2, 13, 4, 5, 120000000, time.FixedZone("X", 3600))
	full := &reqInfo{id: "abc-123", service: "openai", router: "r1", attempts: 2, model: "gpt-4o",
		keyID: "k1", teamID: "t1", tokenID: "tok1", code: "upstream_error", retries: 3}
	cases := []struct {
		name string
		l    accessLine
	}{
		{"minimal", accessLine{ri: &reqInfo{id: "0123456789ab0123456789ab"}, method: "GET", path: "/healthz", status: 200, remote: "127.0.0.1"}},
		{"full", accessLine{ri: full, method: "POST", path: "/v1/openai/v1/chat/completions", status: 502, bytes: 1234, duration: 12.345, remote: "::1"}},
		{"router without model", accessLine{ri: &reqInfo{id: "x", router: "r", attempts: 1}, method: "POST", path: "/", status: 429, duration: 0.001}},
		{"escapes", accessLine{ri: &reqInfo{id: "q\"\\", service: "a\tb\nc\rd\x00e\x1f\x7f"}, method: "G<E>&T", path: "/\u2028/\u2029/é/漢/\xff\xfe/😀", status: 499, remote: "x"}},
		{"tiny duration", accessLine{ri: &reqInfo{id: "x"}, duration: 1e-7}},
		{"huge duration", accessLine{ri: &reqInfo{id: "x"}, duration: 1e22, bytes: -1}},
		{"whole duration", accessLine{ri: &reqInfo{id: "x"}, duration: 1500}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var want bytes.Buffer
			h := slog.NewJSONHandler(&want, &slog.HandlerOptions{ReplaceAttr: durationText})
			rec := slog.NewRecord(at, slog.LevelInfo, "request", 0)
			rec.AddAttrs(tc.l.attrs(nil)...)
			if err := h.Handle(context.Background(), rec); err != nil {
				t.Fatal(err)
			}
			if got := tc.l.appendJSON(nil, at); string(got) != want.String() {
				t.Errorf("hand-built line differs from slog's:\n got %s\nwant %s", got, want.Bytes())
			}
		})
	}
}

// BenchmarkAccessLine compares one access line written through slog's
// JSONHandler with the hand-built one, both into a discarding log buffer.
func BenchmarkAccessLine(b *testing.B) {
	ri := &reqInfo{id: "0123456789ab0123456789ab", service: "openai", keyID: "k1", teamID: "team-1", tokenID: "token-1"}
	l := accessLine{ri: ri, method: "POST", path: "/v1/openai/v1/chat/completions", status: 200, bytes: 312, duration: 1.234, remote: "127.0.0.1"}
	b.Run("slog", func(b *testing.B) {
		log := slog.New(slog.NewJSONHandler(newLogBuffer(io.Discard), &slog.HandlerOptions{ReplaceAttr: durationText}))
		b.ReportAllocs()
		for b.Loop() {
			var attrs [16]slog.Attr
			log.LogAttrs(context.Background(), slog.LevelInfo, "request", l.attrs(attrs[:0])...)
		}
	})
	b.Run("hand", func(b *testing.B) {
		buf := newLogBuffer(io.Discard)
		b.ReportAllocs()
		for b.Loop() {
			bp := lineBufs.Get().(*[]byte)
			*bp = l.appendJSON((*bp)[:0], time.Now())
			_, _ = buf.Write(*bp)
			lineBufs.Put(bp)
		}
	})
}
