package meter

import (
	"bytes"
	"encoding/json"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"net/url"
	pathpkg "path"
	"strings"
)

// RequestInfo is what metering needs from an LLM request body.
type RequestInfo struct {
	// Model is the model the body names: its top-level "model" member
	// (the last one when repeated, as most JSON decoders read it), else
	// "model_id" or "modelId"; "" when there is none. Member names are
	// compared with their escapes decoded ("mod\u0065l" is "model").
	Model string
	// ModelAmbiguous reports that the body's model cannot be told for
	// sure: a top-level model member ("model", "model_id", "modelId")
	// whose value is not a non-empty string, or several naming different
	// models. An allow-list must then refuse the request.
	ModelAmbiguous bool
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

	// Form reports whether [RequestInfo.ReadForm] found a form
	// Content-Type: multipart/form-data or
	// application/x-www-form-urlencoded (or a malformed Content-Type
	// naming one).
	Form bool
	// FormUnreadable reports that a form body could not be read whole as
	// such (at most 1000 parts); an allow-list must then refuse it.
	FormUnreadable bool
	// FormModels are the values of a form body's fields named as in
	// [ModelParams], in order (a multipart value cut at 1 KiB).
	FormModels []string

	usage usageSpot // where WithStreamUsage edits the body
}

// ModelParams are the names under which a request may name its model:
// top-level JSON members, query parameters and form fields ("model" for
// OpenAI-style APIs and Deepgram, "model_id" for ElevenLabs and
// Cartesia).
var ModelParams = [...]string{"model", "model_id", "modelId"}

// IsModelParam reports whether name is one of [ModelParams].
func IsModelParam(name string) bool {
	return name == "model" || name == "model_id" || name == "modelId"
}

// memberName returns a raw JSON member name with its escapes decoded, so
// that "mod\u0065l" compares equal to "model". A name without a
// backslash (the common case) is returned as it is, without allocating.
func memberName(key []byte) []byte {
	if bytes.IndexByte(key, '\\') < 0 {
		return key
	}
	q := make([]byte, 0, len(key)+2)
	q = append(append(append(q, '"'), key...), '"')
	var s string
	if json.Unmarshal(q, &s) != nil {
		return key // an invalid escape: no JSON decoder accepts the body
	}
	return []byte(s)
}

// utf8BOM is a byte order mark, which some JSON decoders skip.
const utf8BOM = "\xef\xbb\xbf"

// InspectRequest reads model, stream, stream_options.include_usage and the
// output token cap from a buffered JSON request body in one pass over its
// top level, skipping large members such as "messages" without decoding
// them. Member names are compared with their escapes decoded. A body that
// is not a JSON object yields a zero RequestInfo; InspectRequest never
// panics.
func InspectRequest(body []byte) RequestInfo {
	var ri RequestInfo
	sp := usageSpot{n: len(body), lastValEnd: -1, optsVS: -1, optsVE: -1, includeVS: -1, includeVE: -1}
	trimmed := bytes.TrimPrefix(body, []byte(utf8BOM))
	sp.bom = len(trimmed) != len(body)
	var named, idModel string // the last "model"; the last "model_id"/"modelId"
	ok := eachMember(trimmed, func(key, val []byte, _, vs, ve int) bool {
		sp.lastValEnd = ve
		switch k := memberName(key); string(k) {
		case "model", "model_id", "modelId":
			m := jsonString(val)
			switch {
			case m == "":
				ri.ModelAmbiguous = true
			case named != "" && m != named, idModel != "" && m != idModel:
				ri.ModelAmbiguous = true
			}
			if string(k) == "model" {
				named = m
			} else {
				idModel = m
			}
		case "stream":
			ri.Stream = string(val) == "true"
		case "stream_options":
			ri.IncludeUsage = false
			sp.optsVS, sp.optsVE, sp.includeVS, sp.includeVE, sp.optsEmpty = vs, ve, -1, -1, true
			sp.optsOK = eachMember(val, func(k, v []byte, _, ivs, ive int) bool {
				sp.optsEmpty = false
				if string(memberName(k)) == "include_usage" {
					ri.IncludeUsage = string(v) == "true"
					sp.includeVS, sp.includeVE = vs+ivs, vs+ive
				}
				return true
			})
		case "max_tokens", "max_completion_tokens", "max_output_tokens":
			ri.MaxTokens = max(ri.MaxTokens, jsonInt(val))
		case "generationConfig", "generation_config":
			eachMember(val, func(k, v []byte, _, _, _ int) bool {
				if k := memberName(k); string(k) == "maxOutputTokens" || string(k) == "max_output_tokens" {
					ri.MaxTokens = max(ri.MaxTokens, jsonInt(v))
				}
				return true
			})
		}
		return true
	})
	if !ok {
		return RequestInfo{usage: usageSpot{n: len(body), lastValEnd: -1}}
	}
	ri.usage = sp
	ri.Model = named
	if ri.Model == "" {
		ri.Model = idModel
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

// usageSpot is where a body would take "stream_options.include_usage":
// true, as [InspectRequest]'s scan found it, so that
// [RequestInfo.WithStreamUsage] edits the body without reading it again.
// Offsets index the body as given (a body with a byte order mark is never
// edited).
type usageSpot struct {
	n          int  // len(body) scanned
	bom        bool // the body starts with a byte order mark
	lastValEnd int  // end of the last top-level value; -1 with no member
	optsVS     int  // the last "stream_options" value; -1 when absent
	optsVE     int
	includeVS  int // its last "include_usage" value; -1 when absent
	includeVE  int
	optsOK     bool // the stream_options object could be read
	optsEmpty  bool // the stream_options object has no member
}

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
// did not ask for. With the body's [RequestInfo] at hand, call
// [RequestInfo.WithStreamUsage] instead: it does not read the body again.
func EnsureStreamUsage(body []byte) (newBody []byte, added bool) {
	return InspectRequest(body).WithStreamUsage(body)
}

// WithStreamUsage is [EnsureStreamUsage] from the positions ri's scan
// recorded, without reading body again. body must be the one ri was read
// from by [InspectRequest]; a body of another length is read again.
func (ri RequestInfo) WithStreamUsage(body []byte) (newBody []byte, added bool) {
	if ri.usage.n != len(body) {
		ri = InspectRequest(body)
	}
	sp := &ri.usage
	if !ri.Stream || len(body) == 0 || sp.bom || sp.lastValEnd < 0 {
		return body, false
	}
	if sp.optsVS < 0 {
		// No stream_options: add it after the last member.
		const add = `,"stream_options":{` + includeUsageMember + `}`
		out := make([]byte, 0, len(body)+len(add))
		out = append(out, body[:sp.lastValEnd]...)
		out = append(out, add...)
		return append(out, body[sp.lastValEnd:]...), true
	}
	opts := body[sp.optsVS:sp.optsVE]
	switch {
	case string(opts) == "null":
		const repl = `{` + includeUsageMember + `}`
		out := make([]byte, 0, len(body)+len(repl))
		out = append(out, body[:sp.optsVS]...)
		out = append(out, repl...)
		return append(out, body[sp.optsVE:]...), true
	case opts[0] == '{' && sp.optsOK:
	default:
		return body, false
	}
	if ri.IncludeUsage {
		return body, false
	}
	if sp.includeVS >= 0 {
		// "include_usage":false (or null): flip the value.
		out := make([]byte, 0, len(body)+4)
		out = append(out, body[:sp.includeVS]...)
		out = append(out, "true"...)
		return append(out, body[sp.includeVE:]...), true
	}
	ins := sp.optsVS + 1 // just past the '{'
	add := includeUsageMember + ","
	if sp.optsEmpty {
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

// SetModel returns body with the value of every top-level model member
// ("model", "model_id", "modelId", names compared unescaped) replaced by
// model as a JSON string, and whether any was found. The body is not
// changed when it is not a JSON object; the input slice is never written.
func SetModel(body []byte, model string) ([]byte, bool) {
	var spans [][2]int
	eachMember(body, func(key, _ []byte, _, vs, ve int) bool {
		if IsModelParam(string(memberName(key))) {
			spans = append(spans, [2]int{vs, ve})
		}
		return true
	})
	if len(spans) == 0 {
		return body, false
	}
	quoted, _ := json.Marshal(model)
	out := make([]byte, 0, len(body)+len(spans)*len(quoted))
	last := 0
	for _, sp := range spans {
		out = append(out, body[last:sp[0]]...)
		out = append(out, quoted...)
		last = sp[1]
	}
	return append(out, body[last:]...), true
}

// EachPathModel calls fn with every model a path names in a "models/{m}"
// segment (Gemini, Vertex AI: ".../models/gemini-2.0-flash:generateContent"),
// matched without regard to case. [ModelFromPath] returns the last one.
func EachPathModel(path string, fn func(model string)) {
	if i := strings.IndexByte(path, '?'); i >= 0 {
		path = path[:i]
	}
	const seg = "models/"
	lower := strings.ToLower(path)
	for off := 0; ; {
		i := strings.Index(lower[off:], seg)
		if i < 0 {
			return
		}
		i += off
		off = i + len(seg)
		if i > 0 && path[i-1] != '/' {
			continue
		}
		m := path[off:]
		if j := strings.IndexAny(m, ":/"); j >= 0 {
			m = m[:j]
		}
		fn(m)
	}
}

// ReadForm reads the model fields of a buffered form body into ri's Form,
// FormUnreadable and FormModels, by the request's Content-Type (see
// [EachFormModel]). It is apart from [InspectRequest] because only a
// model allow-list needs them, and a multipart upload costs a pass over
// all its parts.
func (ri *RequestInfo) ReadForm(contentType string, body []byte) {
	ri.FormModels = ri.FormModels[:0]
	form, ok := EachFormModel(contentType, body, func(m string) { ri.FormModels = append(ri.FormModels, m) })
	ri.Form, ri.FormUnreadable = form, form && !ok
}

// maxFormParts bounds how many parts [EachFormModel] reads.
const maxFormParts = 1000

// EachFormModel calls fn with the value of every field named as in
// [ModelParams] of a buffered multipart/form-data or
// application/x-www-form-urlencoded body (such as an OpenAI
// /audio/transcriptions upload), by the request's Content-Type. form
// reports whether the Content-Type is one of those; ok reports whether
// the whole body could be read as such (at most 1000 parts; a model
// value is cut at 1 KiB). Other bodies give form == false.
func EachFormModel(contentType string, body []byte, fn func(model string)) (form, ok bool) {
	if contentType == "" {
		return false, true
	}
	mt, params, err := mime.ParseMediaType(contentType)
	if err != nil {
		lt := strings.ToLower(contentType)
		if strings.Contains(lt, "multipart/") || strings.Contains(lt, "form-urlencoded") {
			return true, false
		}
		return false, true
	}
	switch {
	case mt == "application/x-www-form-urlencoded":
		q, err := url.ParseQuery(string(body))
		for _, name := range ModelParams {
			for _, v := range q[name] {
				fn(v)
			}
		}
		return true, err == nil
	case strings.HasPrefix(mt, "multipart/"):
		boundary := params["boundary"]
		if boundary == "" {
			return true, false
		}
		mr := multipart.NewReader(bytes.NewReader(body), boundary)
		var buf [1024]byte
		for range maxFormParts {
			part, err := mr.NextRawPart()
			if err == io.EOF {
				return true, true
			}
			if err != nil {
				return true, false
			}
			if IsModelParam(part.FormName()) {
				n, _ := io.ReadFull(part, buf[:])
				fn(string(buf[:n]))
			}
		}
		return true, false
	}
	return false, true
}

// RequiresModel reports whether a request to path, which an allow-list
// applies to, must name its model (keypoold refuses it otherwise):
//   - never on the endpoints of resources that take no model: files,
//     uploads, batches, vector stores, threads, conversations,
//     containers;
//   - always on endpoints that take the model in the query and may have
//     no body: OpenAI Realtime (/realtime), Deepgram /listen and /speak,
//     ElevenLabs /text-to-speech/…;
//   - when it has a body: on a metered service (metered), and on every
//     known model endpoint (chat and legacy completions, responses,
//     embeddings, messages, moderations, audio, images, rerank, Gemini
//     and Vertex AI ":generateContent" and friends, speech-to-text and
//     text-to-speech APIs).
//
// The path is compared cleaned and without regard to case.
func RequiresModel(path string, hasBody, metered bool) bool {
	if i := strings.IndexByte(path, '?'); i >= 0 {
		path = path[:i]
	}
	p := pathpkg.Clean("/" + strings.ToLower(path))
	for _, seg := range modelFreeSegments {
		if strings.Contains(p+"/", seg) {
			return false
		}
	}
	for _, s := range queryModelEndpoints {
		if strings.HasSuffix(p, s) || strings.Contains(p, s+"/") {
			return true
		}
	}
	if !hasBody {
		return false
	}
	if metered {
		return true
	}
	for _, s := range modelEndpoints {
		if strings.HasSuffix(p, s) {
			return true
		}
	}
	return strings.Contains(p, "/text-to-speech/") || strings.Contains(p, "/speech-to-speech/")
}

var modelFreeSegments = [...]string{"/files/", "/uploads/", "/batches/", "/vector_stores/",
	"/threads/", "/conversations/", "/containers/"}

var queryModelEndpoints = [...]string{"/realtime", "/listen", "/speak", "/text-to-speech"}

var modelEndpoints = [...]string{"/chat/completions", "/completions", "/responses", "/embeddings",
	"/messages", "/messages/count_tokens", "/moderations", "/audio/transcriptions",
	"/audio/translations", "/audio/speech", "/images/generations", "/images/edits",
	"/images/variations", "/rerank", "/realtime/sessions", "/realtime/transcription_sessions",
	"/realtime/client_secrets", "/fine_tuning/jobs", "/assistants", "/speech-to-text",
	"/sound-generation", "/tts/bytes", "/tts/sse", "/stt",
	":generatecontent", ":streamgeneratecontent", ":counttokens", ":embedcontent",
	":batchembedcontents", ":predict", ":rawpredict", ":streamrawpredict"}
