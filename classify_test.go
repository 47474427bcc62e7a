package keypool

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	tests := []struct {
		name    string
		headers map[string]string
		want    time.Duration
		ok      bool
	}{
		{"seconds", map[string]string{"Retry-After": "30"}, 30 * time.Second, true},
		{"fractional seconds", map[string]string{"Retry-After": "1.5"}, 1500 * time.Millisecond, true},
		{"http date", map[string]string{"Retry-After": now.Add(90 * time.Second).Format(http.TimeFormat)}, 90 * time.Second, true},
		{"retry-after-ms wins", map[string]string{"Retry-After-Ms": "250", "Retry-After": "30"}, 250 * time.Millisecond, true},
		{"openai reset requests", map[string]string{"X-Ratelimit-Reset-Requests": "1m30s"}, 90 * time.Second, true},
		{"openai reset tokens ms", map[string]string{"X-Ratelimit-Reset-Tokens": "6ms"}, 6 * time.Millisecond, true},
		{"longer openai reset", map[string]string{"X-Ratelimit-Reset-Requests": "2s", "X-Ratelimit-Reset-Tokens": "7.5s"}, 7500 * time.Millisecond, true},
		{"anthropic reset", map[string]string{"Anthropic-Ratelimit-Requests-Reset": now.Add(45 * time.Second).Format(time.RFC3339)}, 45 * time.Second, true},
		{"negative", map[string]string{"Retry-After": "-5"}, 0, false},
		{"garbage", map[string]string{"Retry-After": "soon"}, 0, false},
		{"past date", map[string]string{"Retry-After": now.Add(-time.Hour).Format(http.TimeFormat)}, 0, false},
		{"none", nil, 0, false},
		{"huge is returned for the pool to cap", map[string]string{"Retry-After": "86400"}, 24 * time.Hour, true},
		// Values beyond any sane wait are clamped (the pool caps them
		// again), never discarded: a discarded one leaves the key cooling
		// for the 1 s backoff.
		{"absurd seconds clamped", map[string]string{"Retry-After": "99999999999"}, maxRetryAfter, true},
		{"exponent seconds clamped", map[string]string{"Retry-After": "1e12"}, maxRetryAfter, true},
		{"infinite seconds clamped", map[string]string{"Retry-After": "Inf"}, maxRetryAfter, true},
		{"absurd retry-after-ms clamped", map[string]string{"Retry-After-Ms": "1e15"}, maxRetryAfter, true},
		{"NaN is garbage", map[string]string{"Retry-After": "NaN"}, 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := http.Header{}
			for k, v := range tt.headers {
				h.Set(k, v)
			}
			got, ok := ParseRetryAfter(h, now)
			if got != tt.want || ok != tt.ok {
				t.Fatalf("got %v, %v; want %v, %v", got, ok, tt.want, tt.ok)
			}
		})
	}
}

func TestClassify(t *testing.T) {
	now := time.Now()
	long := strings.Repeat("x", 20000)
	tests := []struct {
		name   string
		status int
		body   string
		hdr    map[string]string
		want   OutcomeKind
		after  time.Duration
	}{
		{"ok", 200, "{}", nil, OK, 0},
		{"redirect", 302, "", nil, OK, 0},
		{"429", 429, `{"error":{"code":"rate_limit_exceeded"}}`, map[string]string{"Retry-After": "7"}, RateLimited, 7 * time.Second},
		{"429 insufficient_quota", 429, `{"error":{"type":"insufficient_quota","code":"insufficient_quota"}}`, nil, Exhausted, 0},
		{"401", 401, `{}`, nil, Invalid, 0},
		{"bare 403 is ambiguous", 403, `{}`, nil, Refused, 0},
		{"403 about the request", 403, `{"error":{"message":"You do not have permission to access the File x"}}`, nil, Refused, 0},
		{"403 google permission denied", 403, `{"error":{"code":403,"status":"PERMISSION_DENIED","message":"denied"}}`, nil, Refused, 0},
		{"403 echoing an invalid-key phrase", 403, `{"error":{"message":"invalid_api_key API_KEY_INVALID"}}`, nil, Refused, 0},
		{"403 google API_KEY_INVALID", 403, `{"error":{"status":"PERMISSION_DENIED","details":[{"reason":"API_KEY_INVALID"}]}}`, nil, Invalid, 0},
		{"403 anthropic authentication_error", 403, `{"type":"error","error":{"type":"authentication_error","message":"x"}}`, nil, Invalid, 0},
		{"401 google endpoint without api keys", 401, `{"error":{"status":"UNAUTHENTICATED","details":[{"reason":"CREDENTIALS_MISSING"}]}}`, nil, Refused, 0},
		{"429 gemini per-minute with retryDelay", 429, `{"error":{"status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"33s"}]}}`, nil, RateLimited, 33 * time.Second},
		{"429 gemini per-day with retryDelay", 429, `{"error":{"status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"7200s"}]}}`, nil, Exhausted, 2 * time.Hour},
		{"429 gemini per-day, reset unnamed", 429, `{"error":{"status":"RESOURCE_EXHAUSTED","details":[{"violations":[{"quotaId":"GenerateRequestsPerDayPerProjectPerModel"}]}]}}`, nil, Exhausted, untilPacificMidnight(now)},
		{"429 per-day header wins over retryDelay", 429, `{"error":{"details":[{"violations":[{"quotaId":"RequestsPerDay"}]},{"retryDelay":"9s"}]}}`, map[string]string{"Retry-After": "3600"}, Exhausted, time.Hour},
		{"402", 402, `{}`, nil, Exhausted, 0},
		{"400 gemini bad key", 400, `{"error":{"status":"INVALID_ARGUMENT","details":[{"reason":"API_KEY_INVALID"}]}}`, nil, Invalid, 0},
		{"400 client", 400, `{"error":{"message":"bad model"}}`, nil, ClientError, 0},
		{"400 long body", 400, long, nil, ClientError, 0},
		{"400 echoing a quota phrase", 400, `{"error":{"message":"bad value 'insufficient_quota' for field model"}}`, nil, ClientError, 0},
		{"400 echoing an invalid-key phrase", 400, `{"error":{"message":"invalid api key in prompt: API_KEY_INVALID"}}`, nil, ClientError, 0},
		{"400 anthropic credit balance", 400, `{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too low to access the Anthropic API."}}`, nil, Exhausted, 0},
		{"401 elevenlabs quota", 401, `{"detail":{"status":"quota_exceeded","message":"This request exceeds your quota"}}`, nil, Exhausted, 0},
		{"403 openai-style invalid key", 403, `{"error":{"code":"invalid_api_key"}}`, nil, Invalid, 0},
		{"404", 404, ``, nil, ClientError, 0},
		{"500", 500, ``, nil, Failure, 0},
		{"503", 503, ``, nil, Failure, 0},
		{"529 overloaded", 529, ``, nil, Failure, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec := httptest.NewRecorder()
			for k, v := range tt.hdr {
				rec.Header().Set(k, v)
			}
			rec.WriteHeader(tt.status)
			rec.WriteString(tt.body)
			resp := rec.Result()
			o := Classify(resp, nil, now)
			if o.Kind != tt.want || o.RetryAfter != tt.after {
				t.Fatalf("Classify = %v/%v, want %v/%v", o.Kind, o.RetryAfter, tt.want, tt.after)
			}
			var sb strings.Builder
			buf := make([]byte, 1000)
			for {
				n, err := resp.Body.Read(buf)
				sb.Write(buf[:n])
				if err != nil {
					break
				}
			}
			if sb.String() != tt.body {
				t.Fatalf("body changed by Classify: %d bytes, want %d", sb.Len(), len(tt.body))
			}
		})
	}
	if o := Classify(nil, fmt.Errorf("dial: %w", errors.New("connection refused")), now); o.Kind != Failure {
		t.Fatalf("transport error: %v", o.Kind)
	}
}

type failingBody struct{ n int }

func (f *failingBody) Read(p []byte) (int, error) {
	if f.n == 0 {
		return 0, errors.New("connection reset")
	}
	k := min(len(p), f.n)
	for i := range p[:k] {
		p[i] = 'x'
	}
	f.n -= k
	return k, nil
}

func (f *failingBody) Close() error { return nil }

func TestClassifyKeepsReadErrors(t *testing.T) {
	resp := &http.Response{StatusCode: 429, Header: http.Header{}, Body: &failingBody{n: 100}}
	if o := Classify(resp, nil, time.Now()); o.Kind != RateLimited {
		t.Fatalf("kind %v", o.Kind)
	}
	b, err := io.ReadAll(resp.Body)
	if len(b) != 100 || err == nil || !strings.Contains(err.Error(), "reset") {
		t.Fatalf("read %d bytes, err %v; want 100 and the reset", len(b), err)
	}
}

// TestPerDayQuotaResetsAtPacificMidnight: a per-day quota resets at
// midnight Pacific time: 23:00 PST is an hour before.
func TestPerDayQuotaResetsAtPacificMidnight(t *testing.T) {
	now := time.Date(2026, 1, 2, 7, 0, 0, 0, time.UTC) // 23:00 PST
	if d := untilPacificMidnight(now); d != time.Hour {
		t.Fatalf("got %v, want 1h", d)
	}
}
