// Package httpx holds keypoold's HTTP plumbing shared by the proxy, admin
// and server packages: the JSON error shape OpenAI-style SDKs print, strict
// JSON decoding, and JSON responses.
package httpx

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Stable error codes, as in the HTTP contract.
const (
	CodeBadRequest          = "bad_request"
	CodeInvalidToken        = "invalid_token"
	CodeForbidden           = "forbidden"
	CodeNotFound            = "not_found"
	CodeUnknownService      = "unknown_service"
	CodeConflict            = "conflict"
	CodeRequestTooLarge     = "request_too_large"
	CodeRateLimited         = "rate_limited"
	CodeNoKeyAvailable      = "no_key_available"
	CodeBudgetExceeded      = "budget_exceeded"
	CodeUpstreamUnreachable = "upstream_unreachable"
	CodeUpstreamUnavailable = "upstream_unavailable"
	CodeUpstreamTimeout     = "upstream_timeout"
	CodeInternal            = "internal_error"
	CodeUnavailable         = "unavailable"
	CodeMethodNotAllowed    = "method_not_allowed"
)

// Error is an API error with its HTTP status. It renders as
// {"error":{"message":…,"type":…,"code":…}}.
type Error struct {
	Status  int
	Code    string
	Message string
	// RetryAfter, when positive, is sent as a Retry-After header (whole
	// seconds, rounded up).
	RetryAfter time.Duration
}

// Error returns the message.
func (e *Error) Error() string { return e.Message }

// Errorf returns an *Error with a formatted message.
func Errorf(status int, code, format string, args ...any) *Error {
	return &Error{Status: status, Code: code, Message: fmt.Sprintf(format, args...)}
}

// typeFor maps a status to the OpenAI-style error type.
func typeFor(status int) string {
	switch {
	case status == http.StatusUnauthorized:
		return "authentication_error"
	case status == http.StatusForbidden:
		return "permission_error"
	case status == http.StatusNotFound:
		return "not_found_error"
	case status == http.StatusTooManyRequests:
		return "rate_limit_error"
	case status >= 500:
		return "api_error"
	default:
		return "invalid_request_error"
	}
}

type body struct {
	Error struct {
		Message string `json:"message"`
		Type    string `json:"type"`
		Code    string `json:"code"`
	} `json:"error"`
}

// WriteError writes err as the JSON error shape. An error that is not an
// *Error becomes a 500 internal_error whose message does not echo err (it
// may carry details not meant for clients).
func WriteError(w http.ResponseWriter, err error) {
	var e *Error
	if !errors.As(err, &e) {
		e = &Error{Status: http.StatusInternalServerError, Code: CodeInternal, Message: "internal error"}
	}
	var b body
	b.Error.Message, b.Error.Type, b.Error.Code = e.Message, typeFor(e.Status), e.Code
	h := w.Header()
	if e.RetryAfter > 0 {
		h.Set("Retry-After", strconv.FormatInt(int64((e.RetryAfter+time.Second-1)/time.Second), 10))
	}
	h.Set("Content-Type", "application/json")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Del("Content-Length")
	w.WriteHeader(e.Status)
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false) // messages quote "<name>" as written
	_ = enc.Encode(b)
}

// WriteJSON writes v as JSON with the status.
func WriteJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(v)
}

// DefaultMaxJSON is the body limit DecodeJSON applies when max is zero.
const DefaultMaxJSON = 1 << 20

// DecodeJSON decodes exactly one JSON value from r's body into dst,
// rejecting unknown fields, fields given twice at the same level (in any
// letter case, as encoding/json matches them; the last would win
// silently), trailing data, a wrong Content-Type and bodies over max bytes
// (zero: 1 MiB). Its errors are *Error values naming the problem (413
// request_too_large, 400 bad_request).
func DecodeJSON(w http.ResponseWriter, r *http.Request, dst any, max int64) error {
	if max <= 0 {
		max = DefaultMaxJSON
	}
	if ct := r.Header.Get("Content-Type"); ct != "" && !strings.HasPrefix(strings.ToLower(ct), "application/json") {
		return Errorf(http.StatusBadRequest, CodeBadRequest, "Content-Type must be application/json, not %q", ct)
	}
	data, err := io.ReadAll(http.MaxBytesReader(w, r.Body, max))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return jsonError(err, max)
		}
		return Errorf(http.StatusBadRequest, CodeBadRequest, "reading the request body failed")
	}
	if err := decodeStrict(data, dst, max); err != nil {
		return err
	}
	if name := DuplicateField(data); name != "" {
		return Errorf(http.StatusBadRequest, CodeBadRequest, "field %q appears more than once", name)
	}
	return nil
}

func decodeStrict(data []byte, dst any, max int64) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(dst); err != nil {
		return jsonError(err, max)
	}
	if err := dec.Decode(&struct{}{}); !errors.Is(err, io.EOF) {
		if err != nil {
			if e := jsonError(err, max); e.Status == http.StatusRequestEntityTooLarge {
				return e
			}
		}
		return Errorf(http.StatusBadRequest, CodeBadRequest, "request body must hold a single JSON value")
	}
	return nil
}

// DuplicateField returns the path (a.b[2].c) of the first object member of
// the JSON document data whose name appeared before in the same object,
// compared without regard to case as encoding/json matches struct fields;
// "" when there is none or data is not valid JSON.
func DuplicateField(data []byte) string {
	dec := json.NewDecoder(bytes.NewReader(data))
	name, _ := duplicateIn(dec, "")
	return name
}

func duplicateIn(dec *json.Decoder, path string) (string, error) {
	tok, err := dec.Token()
	if err != nil {
		return "", err
	}
	switch tok {
	case json.Delim('{'):
		seen := map[string]bool{}
		for dec.More() {
			kt, err := dec.Token()
			if err != nil {
				return "", err
			}
			k, _ := kt.(string)
			p := k
			if path != "" {
				p = path + "." + k
			}
			lk := strings.ToLower(k)
			if seen[lk] {
				return p, nil
			}
			seen[lk] = true
			if name, err := duplicateIn(dec, p); name != "" || err != nil {
				return name, err
			}
		}
		_, err = dec.Token()
	case json.Delim('['):
		for i := 0; dec.More(); i++ {
			if name, err := duplicateIn(dec, path+"["+strconv.Itoa(i)+"]"); name != "" || err != nil {
				return name, err
			}
		}
		_, err = dec.Token()
	}
	return "", err
}

func jsonError(err error, max int64) *Error {
	var mbe *http.MaxBytesError
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	switch {
	case errors.As(err, &mbe):
		return Errorf(http.StatusRequestEntityTooLarge, CodeRequestTooLarge, "request body is larger than %d bytes", max)
	case errors.Is(err, io.EOF):
		return Errorf(http.StatusBadRequest, CodeBadRequest, "request body is empty; expected JSON")
	case errors.Is(err, io.ErrUnexpectedEOF):
		return Errorf(http.StatusBadRequest, CodeBadRequest, "malformed JSON: unexpected end of body")
	case errors.As(err, &se):
		return Errorf(http.StatusBadRequest, CodeBadRequest, "malformed JSON at byte %d", se.Offset)
	case errors.As(err, &te):
		field := te.Field
		if field == "" {
			field = "(body)"
		}
		// Value reads "number 1234" for numbers: name the kind, never the
		// value, which may be a secret sent in the wrong field.
		kind, _, _ := strings.Cut(te.Value, " ")
		return Errorf(http.StatusBadRequest, CodeBadRequest, "field %q must be %s, not %s", field, te.Type, kind)
	case strings.HasPrefix(err.Error(), "json: unknown field "):
		return Errorf(http.StatusBadRequest, CodeBadRequest, "unknown field %s", strings.TrimPrefix(err.Error(), "json: unknown field "))
	}
	return Errorf(http.StatusBadRequest, CodeBadRequest, "malformed JSON")
}
