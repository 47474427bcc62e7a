package proxy

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
)

// Redacted replaces a key's secret wherever the proxy scrubs it.
const Redacted = "[redacted]"

// minScrubLen is the shortest secret the proxy searches for in response
// headers and bodies; shorter ones would match ordinary text. Real API keys
// are far longer.
const minScrubLen = 8

// smallErrorBody is the largest error body (by Content-Length) that is
// scrubbed in memory, keeping an exact Content-Length; larger or
// unknown-length error bodies are scrubbed as they stream.
const smallErrorBody = 64 << 10

// secretForms returns the spellings of secret worth searching for: as is
// and, when different, query-escaped.
func secretForms(secret string) []string {
	if q := url.QueryEscape(secret); q != secret {
		return []string{secret, q}
	}
	return []string{secret}
}

func redactString(s, secret string) string {
	for _, f := range secretForms(secret) {
		s = strings.ReplaceAll(s, f, Redacted)
	}
	return s
}

func containsSecret(s, secret string) bool {
	if secret == "" {
		return false
	}
	for _, f := range secretForms(secret) {
		if strings.Contains(s, f) {
			return true
		}
	}
	return false
}

// scrubHeader replaces the secret in every header value.
func scrubHeader(h http.Header, secret string) {
	if len(secret) < minScrubLen {
		return
	}
	q := url.QueryEscape(secret) // no allocation when nothing needs escaping
	for _, vs := range h {
		for i, v := range vs {
			if strings.Contains(v, secret) || (q != secret && strings.Contains(v, q)) {
				vs[i] = redactString(v, secret)
			}
		}
	}
}

// scrubBody replaces the secret in the body of an error response (status ≥
// 400): in memory when the body is small and of known length, otherwise as
// it streams (then Content-Length is dropped).
func scrubBody(resp *http.Response, secret string) {
	if resp.StatusCode < 400 || len(secret) < minScrubLen || resp.Body == nil || resp.Body == http.NoBody {
		return
	}
	if resp.ContentLength >= 0 && resp.ContentLength <= smallErrorBody {
		b, err := io.ReadAll(io.LimitReader(resp.Body, smallErrorBody+1))
		_ = resp.Body.Close()
		s := redactString(string(b), secret)
		var r io.Reader = strings.NewReader(s)
		if err != nil {
			r = io.MultiReader(r, errReader{err})
		}
		resp.Body = io.NopCloser(r)
		if err == nil {
			resp.ContentLength = int64(len(s))
			if resp.Header.Get("Content-Length") != "" {
				resp.Header.Set("Content-Length", strconv.Itoa(len(s)))
			}
		}
		return
	}
	forms := secretForms(secret)
	olds := make([][]byte, len(forms))
	for i, f := range forms {
		olds[i] = []byte(f)
	}
	resp.Body = &scrubReader{rc: resp.Body, olds: olds, tmp: make([]byte, 4096)}
	resp.ContentLength = -1
	resp.Header.Del("Content-Length")
}

type errReader struct{ err error }

func (e errReader) Read([]byte) (int, error) { return 0, e.err }

// scrubReader replaces secrets in a stream. It holds back the longest tail
// that could begin a secret, so a secret split across reads is caught.
type scrubReader struct {
	rc    io.ReadCloser
	olds  [][]byte
	tmp   []byte
	pend  []byte // read, scrubbed, held back
	ready []byte // scrubbed, ready for the caller
	err   error
}

var redactedBytes = []byte(Redacted)

func (s *scrubReader) Read(p []byte) (int, error) {
	for len(s.ready) == 0 {
		if s.err != nil {
			return 0, s.err
		}
		n, err := s.rc.Read(s.tmp)
		s.pend = append(s.pend, s.tmp[:n]...)
		if err != nil {
			s.err = err
		}
		for _, o := range s.olds {
			if bytes.Contains(s.pend, o) {
				s.pend = bytes.ReplaceAll(s.pend, o, redactedBytes)
			}
		}
		keep := 0
		if s.err == nil {
			keep = s.holdback()
		}
		emit := len(s.pend) - keep
		s.ready = append(s.ready[:0], s.pend[:emit]...)
		s.pend = append(s.pend[:0], s.pend[emit:]...)
	}
	n := copy(p, s.ready)
	s.ready = s.ready[n:]
	return n, nil
}

// holdback returns the length of the longest tail of pend that is a proper
// prefix of a secret.
func (s *scrubReader) holdback() int {
	best := 0
	for _, o := range s.olds {
		for k := min(len(o)-1, len(s.pend)); k > best; k-- {
			if bytes.HasSuffix(s.pend, o[:k]) {
				best = k
				break
			}
		}
	}
	return best
}

func (s *scrubReader) Close() error { return s.rc.Close() }

// redactError returns err with secret replaced wherever its message holds
// it. A *url.Error keeps its type (its URL redacted); any other error whose
// message holds the secret becomes a *redactedError that keeps only its
// message (redacted), whether it timed out, and whether it is a context
// cancellation or deadline.
func redactError(err error, secret string) error {
	if err == nil || secret == "" || !containsSecret(err.Error(), secret) {
		return err
	}
	var ue *url.Error
	if errors.As(err, &ue) && err == error(ue) {
		return &url.Error{Op: ue.Op, URL: redactString(ue.URL, secret), Err: redactError(ue.Err, secret)}
	}
	re := &redactedError{msg: redactString(err.Error(), secret)}
	var te interface{ Timeout() bool }
	re.timeout = errors.As(err, &te) && te.Timeout()
	switch {
	case errors.Is(err, context.Canceled):
		re.cause = context.Canceled
	case errors.Is(err, context.DeadlineExceeded):
		re.cause = context.DeadlineExceeded
	}
	return re
}

// redactedError stands in for an error whose message held a secret.
type redactedError struct {
	msg     string
	timeout bool
	cause   error
}

func (e *redactedError) Error() string { return e.msg }
func (e *redactedError) Timeout() bool { return e.timeout }
func (e *redactedError) Unwrap() error { return e.cause }
