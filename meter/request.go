package meter

import (
	"bytes"
	"encoding/json"
	"net/http"
	"strings"
)

// RequestInfo is what metering needs from an LLM request body.
type RequestInfo struct {
	// Model is the top-level "model" field, or "" when there is none.
	Model string
	// Stream reports whether the top-level "stream" field is true.
	Stream bool
	// IncludeUsage reports whether "stream_options.include_usage" is true.
	IncludeUsage bool
	// MaxTokens is the output token cap the request sets: the top-level
	// "max_tokens", "max_completion_tokens" or "max_output_tokens", or
	// Gemini's "generationConfig.maxOutputTokens" (the largest when
	// several are set); 0 when none is a positive integer.
	MaxTokens int64
	// Object reports whether the body is a JSON object at all. When it is
	// false the other fields are zero.
	Object bool
}

// InspectRequest reads model, stream, stream_options.include_usage and the
// output token cap from a buffered JSON request body in one pass over its
// top level, skipping large members such as "messages" without decoding
// them. A body that is
// not a JSON object yields a zero RequestInfo; InspectRequest never panics.
func InspectRequest(body []byte) RequestInfo {
	var ri RequestInfo
	ok := eachMember(body, func(key, val []byte, _, _, _ int) bool {
		switch string(key) {
		case "model":
			ri.Model = jsonString(val)
		case "stream":
			ri.Stream = string(val) == "true"
		case "stream_options":
			ri.IncludeUsage = false
			eachMember(val, func(k, v []byte, _, _, _ int) bool {
				if string(k) == "include_usage" {
					ri.IncludeUsage = string(v) == "true"
				}
				return true
			})
		case "max_tokens", "max_completion_tokens", "max_output_tokens":
			ri.MaxTokens = max(ri.MaxTokens, jsonInt(val))
		case "generationConfig", "generation_config":
			eachMember(val, func(k, v []byte, _, _, _ int) bool {
				if string(k) == "maxOutputTokens" || string(k) == "max_output_tokens" {
					ri.MaxTokens = max(ri.MaxTokens, jsonInt(v))
				}
				return true
			})
		}
		return true
	})
	if !ok {
		return RequestInfo{}
	}
	ri.Object = true
	return ri
}

// jsonInt returns a raw JSON value as a positive integer, or 0 when it is
// not a plain non-negative integer (or would overflow).
func jsonInt(val []byte) int64 {
	if len(val) == 0 || len(val) > 18 {
		return 0
	}
	var n int64
	for _, c := range val {
		if c < '0' || c > '9' {
			return 0
		}
		n = n*10 + int64(c-'0')
	}
	return n
}

// jsonString returns the Go string of a raw JSON string value, or "" when
// val is not a string.
func jsonString(val []byte) string {
	if len(val) < 2 || val[0] != '"' || val[len(val)-1] != '"' {
		return ""
	}
	inner := val[1 : len(val)-1]
	if bytes.IndexByte(inner, '\\') < 0 {
		return string(inner)
	}
	var s string
	if json.Unmarshal(val, &s) != nil {
		return ""
	}
	return s
}

const includeUsageMember = `"include_usage":true`

// EnsureStreamUsage makes an OpenAI-compatible streaming request ask for a
// final usage chunk: when body is a JSON object with "stream":true and
// without "stream_options.include_usage":true, it returns a new body with
// the option set and added == true. Every other byte of the body is kept as
// it was. A body that is not a JSON object, does not stream, or already
// asks for usage is returned unchanged with added == false; body itself is
// never modified.
//
// Only call it for endpoints that accept stream_options (see
// [AcceptsStreamOptions]). When added is true, wrap the response with
// [Options.StripUsageChunk] set so the client does not receive the chunk it
// did not ask for.
func EnsureStreamUsage(body []byte) (newBody []byte, added bool) {
	var (
		stream          bool
		optsVS, optsVE  = -1, -1
		lastValEnd      = -1
		includeVS       = -1
		includeVE       = -1
		includeOK       bool
		optsObjectEmpty bool
	)
	ok := eachMember(body, func(key, val []byte, _, vs, ve int) bool {
		lastValEnd = ve
		switch string(key) {
		case "stream":
			stream = string(val) == "true"
		case "stream_options":
			optsVS, optsVE = vs, ve
		}
		return true
	})
	if !ok || !stream || lastValEnd < 0 {
		return body, false
	}
	if optsVS < 0 {
		// No stream_options: add it after the last member.
		const add = `,"stream_options":{` + includeUsageMember + `}`
		out := make([]byte, 0, len(body)+len(add))
		out = append(out, body[:lastValEnd]...)
		out = append(out, add...)
		return append(out, body[lastValEnd:]...), true
	}
	opts := body[optsVS:optsVE]
	switch {
	case string(opts) == "null":
		const repl = `{` + includeUsageMember + `}`
		out := make([]byte, 0, len(body)+len(repl))
		out = append(out, body[:optsVS]...)
		out = append(out, repl...)
		return append(out, body[optsVE:]...), true
	case len(opts) > 0 && opts[0] == '{':
		optsObjectEmpty = true
		if !eachMember(opts, func(k, v []byte, _, vs, ve int) bool {
			optsObjectEmpty = false
			if string(k) == "include_usage" {
				includeVS, includeVE = optsVS+vs, optsVS+ve
				includeOK = string(v) == "true"
			}
			return true
		}) {
			return body, false
		}
	default:
		return body, false
	}
	if includeOK {
		return body, false
	}
	if includeVS >= 0 {
		// "include_usage":false (or null): flip the value.
		out := make([]byte, 0, len(body)+4)
		out = append(out, body[:includeVS]...)
		out = append(out, "true"...)
		return append(out, body[includeVE:]...), true
	}
	ins := optsVS + 1 // just past the '{'
	add := includeUsageMember + ","
	if optsObjectEmpty {
		add = includeUsageMember
	}
	out := make([]byte, 0, len(body)+len(add))
	out = append(out, body[:ins]...)
	out = append(out, add...)
	return append(out, body[ins:]...), true
}

// AcceptsStreamOptions reports whether an OpenAI-compatible endpoint path
// accepts "stream_options" (Chat Completions and legacy Completions). The
// Responses API always reports usage in its response.completed event and
// rejects the field.
func AcceptsStreamOptions(path string) bool {
	if i := strings.IndexByte(path, '?'); i >= 0 {
		path = path[:i]
	}
	path = strings.TrimRight(path, "/")
	return strings.HasSuffix(path, "/chat/completions") || strings.HasSuffix(path, "/completions")
}

// ModelFromPath returns the model named in a Gemini-style path, such as
// "gemini-2.0-flash" from "/v1beta/models/gemini-2.0-flash:generateContent"
// or from a Vertex AI ".../publishers/google/models/gemini-2.0-flash:streamGenerateContent"
// path. It returns "" when the path names no model.
func ModelFromPath(path string) string {
	if i := strings.IndexByte(path, '?'); i >= 0 {
		path = path[:i]
	}
	const seg = "models/"
	i := strings.LastIndex(path, seg)
	if i < 0 || (i > 0 && path[i-1] != '/') {
		return ""
	}
	m := path[i+len(seg):]
	if j := strings.IndexAny(m, ":/"); j >= 0 {
		m = m[:j]
	}
	return m
}

// IsStreamPath reports whether a Gemini-style path asks for a stream
// (":streamGenerateContent").
func IsStreamPath(path string) bool {
	return strings.Contains(path, ":streamGenerateContent")
}

// NegotiateIdentity asks the upstream for an uncompressed response by
// setting "Accept-Encoding: identity" on an outgoing request's headers.
// Call it for every metered request: a [Reader] does not decompress, and
// gives up (Found == false) on a body whose Content-Encoding is not
// identity. LLM responses are small next to their latency, so the
// bandwidth lost is minor; streams are rarely compressed anyway.
func NegotiateIdentity(h http.Header) {
	h.Set("Accept-Encoding", "identity")
}
