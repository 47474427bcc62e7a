package httpx

import (
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestDecodeJSON(t *testing.T) {
	type dst struct {
		Name  string         `json:"name"`
		Count int            `json:"count"`
		Tags  map[string]any `json:"tags"`
		List  []struct {
			A int `json:"a"`
		} `json:"list"`
	}
	tests := []struct {
		name, body, ctype string
		max               int64
		status            int
		msg               string
	}{
		{"ok", `{"name":"a","count":2}`, "application/json", 0, 0, ""},
		{"ok without content type", `{"name":"a"}`, "", 0, 0, ""},
		{"empty", ``, "", 0, 400, "empty"},
		{"malformed", `{"name":`, "", 0, 400, "malformed"},
		{"syntax", `{"name" "a"}`, "", 0, 400, "malformed JSON at byte"},
		{"unknown field", `{"nam":"a"}`, "", 0, 400, `unknown field "nam"`},
		{"wrong type", `{"count":"two"}`, "", 0, 400, `field "count" must be int`},
		{"number never echoed", `{"name":12345678901234}`, "", 0, 400, `must be string, not number`},
		{"trailing data", `{"name":"a"} {"name":"b"}`, "", 0, 400, "single JSON value"},
		{"too large", `{"name":"` + strings.Repeat("x", 100) + `"}`, "", 50, 413, "larger than 50 bytes"},
		{"wrong content type", `name=a`, "application/x-www-form-urlencoded", 0, 400, "Content-Type"},
		{"duplicate field", `{"name":"a","name":"b"}`, "", 0, 400, `field "name" appears more than once`},
		{"duplicate field other case", `{"name":"a","NAME":"b"}`, "", 0, 400, `field "NAME" appears more than once`},
		{"duplicate nested field", `{"name":"a","tags":{"x":1,"y":{"z":1,"z":2}}}`, "", 0, 400, `field "tags.y.z" appears more than once`},
		{"duplicate in array element", `{"list":[{"a":1},{"a":1,"a":2}]}`, "", 0, 400, `field "list[1].a" appears more than once`},
		{"same name at different levels", `{"name":"a","tags":{"name":"b"}}`, "", 0, 0, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := httptest.NewRequest("POST", "/", strings.NewReader(tt.body))
			if tt.ctype != "" {
				r.Header.Set("Content-Type", tt.ctype)
			}
			var d dst
			err := DecodeJSON(httptest.NewRecorder(), r, &d, tt.max)
			if tt.status == 0 {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			var e *Error
			if !errors.As(err, &e) || e.Status != tt.status || !strings.Contains(e.Message, tt.msg) || strings.Contains(e.Message, "12345678901234") {
				t.Fatalf("err = %#v, want %d containing %q", err, tt.status, tt.msg)
			}
		})
	}
}

func TestWriteError(t *testing.T) {
	rec := httptest.NewRecorder()
	WriteError(rec, &Error{Status: 429, Code: CodeNoKeyAvailable, Message: "no key", RetryAfter: 1500 * time.Millisecond})
	if rec.Code != 429 || rec.Header().Get("Retry-After") != "2" || rec.Header().Get("Content-Type") != "application/json" {
		t.Fatalf("status %d headers %v", rec.Code, rec.Header())
	}
	var b struct {
		Error struct{ Message, Type, Code string }
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &b); err != nil {
		t.Fatal(err)
	}
	if b.Error.Code != "no_key_available" || b.Error.Type != "rate_limit_error" || b.Error.Message != "no key" {
		t.Fatalf("body %s", rec.Body)
	}
	// A plain error never echoes its text.
	rec = httptest.NewRecorder()
	WriteError(rec, errors.New("dial tcp: secret-host sk-live-123"))
	if rec.Code != http.StatusInternalServerError || strings.Contains(rec.Body.String(), "sk-live") {
		t.Fatalf("internal error leaked: %d %s", rec.Code, rec.Body)
	}
}

// TestWriteErrorKeepsAngleBrackets: messages quote user input such as
// "<name>"; they read as written, not as \u003c (issue 14).
func TestWriteErrorKeepsAngleBrackets(t *testing.T) {
	rec := httptest.NewRecorder()
	WriteError(rec, Errorf(400, CodeBadRequest, "want header:<Name> & query:<name>"))
	if body := rec.Body.String(); !strings.Contains(body, `want header:<Name> & query:<name>`) {
		t.Errorf("body %s", body)
	}
}
