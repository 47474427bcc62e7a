package server

import (
	"context"
	"encoding/json"
	"log/slog"
	"math"
	"net/http"
	"strconv"
	"sync"
	"time"
	"unicode/utf8"
)

// accessLine is one request's access line: what observe knows once the
// handler returned.
type accessLine struct {
	ri       *reqInfo
	method   string
	path     string
	status   int
	bytes    int64
	duration float64 // milliseconds
	remote   string
}

// access writes the access line of a request; status, when not zero,
// overrides the status written.
func (s *Server) access(r *http.Request, ri *reqInfo, status int, start time.Time) {
	if !s.log.Enabled(context.Background(), slog.LevelInfo) {
		return
	}
	if status == 0 {
		status = ri.w.Status()
	}
	if status == 0 {
		status = http.StatusOK
		if r.Context().Err() != nil {
			status = 499 // client closed the request before an answer
		}
	}
	l := accessLine{
		ri:       ri,
		method:   r.Method,
		path:     safePath(redactCredential(r, ri, r.URL.Path)),
		status:   status,
		bytes:    ri.w.BytesWritten(),
		duration: float64(time.Since(start).Microseconds()) / 1000,
		remote:   s.clients.of(r),
	}
	if s.accessJSON {
		// The server's own JSON logger: the line slog would write, built
		// by hand into a pooled buffer (no attribute boxing, no handler
		// state), one write to the log buffer.
		bp := lineBufs.Get().(*[]byte)
		b := l.appendJSON((*bp)[:0], time.Now())
		_, _ = s.logBuf.Write(b)
		*bp = b
		lineBufs.Put(bp)
		return
	}
	var attrs [16]slog.Attr
	s.log.LogAttrs(context.Background(), slog.LevelInfo, "request", l.attrs(attrs[:0])...)
}

// attrs appends the line's fields as slog attributes, in the order
// appendJSON writes them.
func (l *accessLine) attrs(a []slog.Attr) []slog.Attr {
	ri := l.ri
	a = append(a,
		slog.String("request_id", ri.id),
		slog.String("method", l.method),
		slog.String("path", l.path),
		slog.Int("status", l.status),
		slog.Int64("bytes", l.bytes),
		slog.Float64("duration_ms", l.duration),
		slog.String("remote", l.remote),
	)
	if ri.service != "" {
		a = append(a, slog.String("service", ri.service))
	}
	if ri.router != "" {
		a = append(a, slog.String("router", ri.router), slog.Int("route_attempts", ri.attempts))
		if ri.model != "" {
			a = append(a, slog.String("model", ri.model))
		}
	}
	if ri.keyID != "" {
		a = append(a, slog.String("key_id", ri.keyID))
	}
	if ri.teamID != "" {
		a = append(a, slog.String("team_id", ri.teamID))
	}
	if ri.tokenID != "" {
		a = append(a, slog.String("token_id", ri.tokenID))
	}
	if ri.code != "" {
		a = append(a, slog.String("code", ri.code))
	}
	if ri.retries > 0 {
		a = append(a, slog.Int("retries", ri.retries))
	}
	return a
}

// lineBufs holds access-line buffers.
var lineBufs = sync.Pool{New: func() any { b := make([]byte, 0, 512); return &b }}

// appendJSON appends the line as slog's JSONHandler writes the record
// "request" at level INFO and time t with l.attrs, byte for byte
// (TestAccessLineMatchesSlog pins it), newline included.
func (l *accessLine) appendJSON(b []byte, t time.Time) []byte {
	ri := l.ri
	b = append(b, `{"time":"`...)
	b = t.AppendFormat(b, time.RFC3339Nano)
	b = append(b, `","level":"INFO","msg":"request","request_id":`...)
	b = appendJSONString(b, ri.id)
	b = append(b, `,"method":`...)
	b = appendJSONString(b, l.method)
	b = append(b, `,"path":`...)
	b = appendJSONString(b, l.path)
	b = append(b, `,"status":`...)
	b = strconv.AppendInt(b, int64(l.status), 10)
	b = append(b, `,"bytes":`...)
	b = strconv.AppendInt(b, l.bytes, 10)
	b = append(b, `,"duration_ms":`...)
	b = appendJSONFloat(b, l.duration)
	b = append(b, `,"remote":`...)
	b = appendJSONString(b, l.remote)
	if ri.service != "" {
		b = append(b, `,"service":`...)
		b = appendJSONString(b, ri.service)
	}
	if ri.router != "" {
		b = append(b, `,"router":`...)
		b = appendJSONString(b, ri.router)
		b = append(b, `,"route_attempts":`...)
		b = strconv.AppendInt(b, int64(ri.attempts), 10)
		if ri.model != "" {
			b = append(b, `,"model":`...)
			b = appendJSONString(b, ri.model)
		}
	}
	if ri.keyID != "" {
		b = append(b, `,"key_id":`...)
		b = appendJSONString(b, ri.keyID)
	}
	if ri.teamID != "" {
		b = append(b, `,"team_id":`...)
		b = appendJSONString(b, ri.teamID)
	}
	if ri.tokenID != "" {
		b = append(b, `,"token_id":`...)
		b = appendJSONString(b, ri.tokenID)
	}
	if ri.code != "" {
		b = append(b, `,"code":`...)
		b = appendJSONString(b, ri.code)
	}
	if ri.retries > 0 {
		b = append(b, `,"retries":`...)
		b = strconv.AppendInt(b, int64(ri.retries), 10)
	}
	return append(b, "}\n"...)
}

// appendJSONFloat appends f as encoding/json (and so slog) writes it.
func appendJSONFloat(b []byte, f float64) []byte {
	if abs := math.Abs(f); abs != 0 && (abs < 1e-6 || abs >= 1e21) || math.IsNaN(f) || math.IsInf(f, 0) {
		j, err := json.Marshal(f)
		if err != nil {
			return append(b, `"!ERROR:`+err.Error()+`"`...)
		}
		return append(b, j...)
	}
	return strconv.AppendFloat(b, f, 'f', -1, 64)
}

// appendJSONString appends s quoted as slog's JSONHandler quotes it: the
// characters below U+0020, '"' and '\\' escaped, invalid UTF-8 as
// \ufffd, U+2028 and U+2029 escaped; HTML characters kept.
func appendJSONString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		if c := s[i]; c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hex[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
