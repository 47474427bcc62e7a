package keypool

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Classifier decides what an upstream answer says about the key that was
// used: served, rate-limited, revoked, out of quota, failing, or a fault of
// the request itself. Replace it to teach keypool an API's own signals.
// resp is nil when err is not.
type Classifier func(resp *http.Response, err error) Outcome

// peekLimit bounds how much of an error body Classify reads to find an
// API's quota or invalid-key code.
const peekLimit = 8 << 10

// Classify is the default policy. A key's state changes only on evidence
// that is unambiguously about the key:
//
//   - 2xx and 3xx: OK.
//   - 429: RateLimited with the wait the upstream asked for (see
//     [ParseRetryAfter], and Google's RetryInfo retryDelay), or Exhausted
//     when the body's error code says the quota or balance is spent
//     (OpenAI's insufficient_quota and the like) or names a per-day quota
//     (Google's RESOURCE_EXHAUSTED with a quotaId "…PerDay…"): then
//     RetryAfter is the reset the upstream named, or for a per-day quota
//     without one, the next midnight Pacific time (when Google resets).
//   - 401: Invalid, unless the error code says the quota is spent, or that
//     the endpoint does not take API keys at all (Google's
//     CREDENTIALS_MISSING, ACCESS_TOKEN_TYPE_UNSUPPORTED): Refused, since
//     every key would get the same answer.
//   - 403: Invalid only with a structured invalid-key code (OpenAI's
//     invalid_api_key, Google's API_KEY_INVALID, Anthropic's
//     authentication_error, …); Exhausted with a quota code; otherwise
//     Refused: a bare 403 may be about the request (a file the key may not
//     read) as much as the key.
//   - 402: Exhausted.
//   - 400 whose error code says the key is invalid (Gemini's
//     API_KEY_INVALID) or the quota is spent: Invalid or Exhausted; any
//     other 400: ClientError.
//
// Codes are read from the error body's structured fields only, never from
// its free text, so a client cannot steer a key's state through an
// upstream that echoes its request.
//   - 408, 500, 502, 503, 504, 529 and transport errors (resets, timeouts):
//     Failure.
//   - A canceled context: Canceled. Other 4xx: ClientError.
//
// To read an error body Classify consumes up to 8 KiB of it and puts back
// a body that yields the same bytes.
func Classify(resp *http.Response, err error, now time.Time) Outcome {
	if err != nil {
		if errors.Is(err, context.Canceled) {
			return Outcome{Kind: Canceled, Reason: "canceled"}
		}
		return Outcome{Kind: Failure, Reason: transportReason(err)}
	}
	code := resp.StatusCode
	switch {
	case code < 400:
		return Outcome{Kind: OK}
	case code == http.StatusPaymentRequired:
		return Outcome{Kind: Exhausted, Reason: "402 payment required", RetryAfter: retryAfterOrZero(resp.Header, now)}
	case code == http.StatusTooManyRequests, code == http.StatusUnauthorized, code == http.StatusForbidden, code == http.StatusBadRequest:
		body := peekBody(resp)
		sig := readSignals(body)
		wait := retryAfterOrZero(resp.Header, now)
		if wait == 0 {
			wait = sig.retryDelay
		}
		if reason := sig.quota(); reason != "" {
			return Outcome{Kind: Exhausted, Reason: reason, RetryAfter: wait}
		}
		if code == http.StatusTooManyRequests && sig.perDay {
			if wait == 0 {
				wait = untilPacificMidnight(now)
			}
			return Outcome{Kind: Exhausted, Reason: "daily quota exhausted", RetryAfter: wait}
		}
		switch code {
		case http.StatusTooManyRequests:
			return Outcome{Kind: RateLimited, Reason: "429 rate limited", RetryAfter: wait}
		case http.StatusBadRequest:
			if sig.invalid() {
				return Outcome{Kind: Invalid, Reason: "400 invalid api key"}
			}
			return Outcome{Kind: ClientError, Reason: "400"}
		case http.StatusUnauthorized:
			if sig.has(notForKeysCodes) {
				return Outcome{Kind: Refused, Reason: "401 endpoint does not take api keys"}
			}
			return Outcome{Kind: Invalid, Reason: "401 unauthorized"}
		}
		if sig.invalid() {
			return Outcome{Kind: Invalid, Reason: "403 invalid api key"}
		}
		return Outcome{Kind: Refused, Reason: "403 forbidden"}
	case code == http.StatusRequestTimeout, code == 500, code == 502, code == 503, code == 504, code == 529:
		return Outcome{Kind: Failure, Reason: strconv.Itoa(code) + " upstream error"}
	case code >= 500:
		return Outcome{Kind: Failure, Reason: strconv.Itoa(code) + " upstream error"}
	}
	return Outcome{Kind: ClientError, Reason: strconv.Itoa(code)}
}

func transportReason(err error) string {
	var ne interface{ Timeout() bool }
	if errors.As(err, &ne) && ne.Timeout() {
		return "upstream timeout"
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return "upstream timeout"
	}
	return "upstream unreachable"
}

func retryAfterOrZero(h http.Header, now time.Time) time.Duration {
	d, _ := ParseRetryAfter(h, now)
	return d
}

// errReader is a body whose every read fails with err: the error a peek
// met, handed on to the body's reader.
type errReader struct{ err error }

// Read returns e.err.
func (e errReader) Read([]byte) (int, error) { return 0, e.err }

type peekedBody struct {
	io.Reader
	io.Closer
}

func peekBody(resp *http.Response) []byte {
	if resp.Body == nil || resp.Body == http.NoBody {
		return nil
	}
	buf := make([]byte, peekLimit)
	n, err := io.ReadFull(resp.Body, buf)
	buf = buf[:n]
	switch {
	case err == io.EOF || err == io.ErrUnexpectedEOF:
		// The whole body fit: replay it.
		_ = resp.Body.Close()
		resp.Body = io.NopCloser(bytes.NewReader(buf))
		return buf
	case err != nil:
		// The read failed: replay what was read, then the same error, so
		// the reader cannot mistake a truncated body for a whole one.
		resp.Body = peekedBody{io.MultiReader(bytes.NewReader(buf), errReader{err}), resp.Body}
		return buf
	}
	resp.Body = peekedBody{io.MultiReader(bytes.NewReader(buf), resp.Body), resp.Body}
	return buf
}

// Quota and invalid-key signals are read only from an error body's
// structured code fields (error.code, error.type, error.status,
// error.details[].reason, detail.status, and the same at the top level),
// never from free text: an upstream that echoes the client's request in
// its error would otherwise let any client mark keys exhausted or invalid.
var (
	quotaCodes = map[string]bool{
		"insufficient_quota": true, "quota_exceeded": true, "billing_hard_limit_reached": true,
		"insufficient_credits": true, "insufficient_balance": true, "credits_exhausted": true,
	}
	invalidCodes = map[string]bool{
		"api_key_invalid": true, "invalid_api_key": true, "authentication_error": true,
		"api_key_expired": true, "account_deactivated": true, "invalid_x_api_key": true,
	}
	// notForKeysCodes say an endpoint takes no API key at all: every key
	// would be refused alike.
	notForKeysCodes = map[string]bool{"credentials_missing": true, "access_token_type_unsupported": true}
)

// signals is what an error body says in its structured fields.
type signals struct {
	codes      []string
	message    string
	perDay     bool          // a quota id names a per-day quota
	retryDelay time.Duration // Google's RetryInfo
}

func readSignals(body []byte) signals {
	var sg signals
	sg.codes, sg.message, sg.perDay, sg.retryDelay = errorCodes(body)
	return sg
}

func (sg *signals) has(set map[string]bool) bool {
	for _, c := range sg.codes {
		if set[c] {
			return true
		}
	}
	return false
}

func (sg *signals) invalid() bool { return sg.has(invalidCodes) }

func (sg *signals) quota() string {
	for _, c := range sg.codes {
		if quotaCodes[c] {
			return "quota exhausted (" + c + ")"
		}
	}
	// Anthropic says so only in prose, at the start of its own message.
	if strings.HasPrefix(sg.message, "Your credit balance is too low") {
		return "quota exhausted (credit balance too low)"
	}
	return ""
}

// pacific is where Google's daily quotas reset; a fixed UTC-8 when the
// zone database is missing.
var pacific = func() *time.Location {
	if loc, err := time.LoadLocation("America/Los_Angeles"); err == nil {
		return loc
	}
	return time.FixedZone("PST", -8*3600)
}()

// untilPacificMidnight returns the time from now to the next midnight in
// US Pacific time.
func untilPacificMidnight(now time.Time) time.Duration {
	t := now.In(pacific)
	next := time.Date(t.Year(), t.Month(), t.Day()+1, 0, 0, 0, 0, pacific)
	return next.Sub(now)
}

// errorCodes returns the lower-cased values of an error body's code
// fields, its message, whether a quota violation names a per-day quota,
// and Google's RetryInfo delay.
func errorCodes(body []byte) (codes []string, message string, perDay bool, retryDelay time.Duration) {
	if len(body) == 0 || body[0] != '{' && bytes.IndexByte(body, '{') < 0 {
		return nil, "", false, 0
	}
	type detail struct {
		Reason     string `json:"reason"`
		Status     string `json:"status"`
		RetryDelay string `json:"retryDelay"`
		Violations []struct {
			QuotaID string `json:"quotaId"`
		} `json:"violations"`
	}
	type inner struct {
		Code    json.RawMessage `json:"code"`
		Type    string          `json:"type"`
		Status  string          `json:"status"`
		Message string          `json:"message"`
		Details []detail        `json:"details"`
	}
	var doc struct {
		inner
		Error   *inner          `json:"error"`
		Detail  json.RawMessage `json:"detail"`
		ErrCode string          `json:"err_code"`
	}
	if json.Unmarshal(body, &doc) != nil {
		return nil, "", false, 0
	}
	add := func(v string) {
		if v != "" {
			codes = append(codes, strings.ToLower(v))
		}
	}
	addInner := func(in *inner) {
		var code string
		if json.Unmarshal(in.Code, &code) == nil {
			add(code)
		}
		add(in.Type)
		add(in.Status)
		for _, d := range in.Details {
			add(d.Reason)
			add(d.Status)
			for _, v := range d.Violations {
				if strings.Contains(v.QuotaID, "PerDay") {
					perDay = true
				}
			}
			if rd, err := time.ParseDuration(d.RetryDelay); err == nil && rd > 0 {
				retryDelay = rd
			}
		}
	}
	addInner(&doc.inner)
	message = doc.Message
	if doc.Error != nil {
		addInner(doc.Error)
		message = doc.Error.Message
	}
	var d detail
	if json.Unmarshal(doc.Detail, &d) == nil {
		add(d.Status)
	}
	add(doc.ErrCode)
	return codes, message, perDay, retryDelay
}

// maxRetryAfter is the longest wait ParseRetryAfter returns: larger values
// (and infinite ones) are clamped to it, for the pool to cap again.
const maxRetryAfter = 1e9 * time.Second

// clampWait converts a positive number of seconds (possibly +Inf) to a
// duration no longer than maxRetryAfter.
func clampWait(secs float64) time.Duration {
	if secs >= maxRetryAfter.Seconds() {
		return maxRetryAfter
	}
	return time.Duration(secs * float64(time.Second))
}

// ParseRetryAfter returns how long the upstream asked to wait, from (in
// order) retry-after-ms, Retry-After (seconds or an HTTP date),
// x-ratelimit-reset-requests / x-ratelimit-reset-tokens (OpenAI-style
// durations such as "1m30s" or "6ms"; the longer one) and the
// anthropic-ratelimit-*-reset times (RFC 3339). It reports false when no
// header gives a usable value: missing, malformed, negative or in the past.
// Huge values (up to 1e9 s; larger ones are clamped to it) are returned
// for the pool to cap.
func ParseRetryAfter(h http.Header, now time.Time) (time.Duration, bool) {
	if v := h.Get("Retry-After-Ms"); v != "" {
		if ms, err := strconv.ParseFloat(strings.TrimSpace(v), 64); err == nil && ms > 0 {
			return clampWait(ms / 1000), true
		}
	}
	if v := strings.TrimSpace(h.Get("Retry-After")); v != "" {
		if secs, err := strconv.ParseFloat(v, 64); err == nil {
			if secs > 0 {
				return clampWait(secs), true
			}
		} else if t, err := http.ParseTime(v); err == nil {
			if d := t.Sub(now); d > 0 {
				return d, true
			}
		}
	}
	var best time.Duration
	for _, name := range []string{"X-Ratelimit-Reset-Requests", "X-Ratelimit-Reset-Tokens"} {
		if v := strings.TrimSpace(h.Get(name)); v != "" {
			if d, err := time.ParseDuration(v); err == nil && d > best {
				best = d
			} else if err != nil {
				if secs, err := strconv.ParseFloat(v, 64); err == nil && secs > 0 {
					best = max(best, clampWait(secs))
				}
			}
		}
	}
	for _, name := range []string{"Anthropic-Ratelimit-Requests-Reset", "Anthropic-Ratelimit-Tokens-Reset", "Anthropic-Ratelimit-Input-Tokens-Reset", "Anthropic-Ratelimit-Output-Tokens-Reset"} {
		if v := h.Get(name); v != "" {
			if t, err := time.Parse(time.RFC3339, strings.TrimSpace(v)); err == nil {
				best = max(best, t.Sub(now))
			}
		}
	}
	if best > 0 {
		return best, true
	}
	return 0, false
}
