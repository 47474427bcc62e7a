package proxy

import (
	"bytes"
	"context"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/keypool/keypool/internal/httpx"
)

// credentialHeaders are the headers SDKs put their API key in.
var credentialHeaders = []string{"Authorization", "X-Api-Key", "Xi-Api-Key", "X-Goog-Api-Key"}

// credentialParams are the query parameters SDKs put their API key in.
var credentialParams = []string{"api_key", "key"}

// deniedHeaders are removed from every forwarded request, besides the
// X-Forwarded-* and X-Keypool-* families.
var deniedHeaders = map[string]bool{
	"Authorization":       true,
	"X-Api-Key":           true,
	"Xi-Api-Key":          true,
	"X-Goog-Api-Key":      true,
	"Cookie":              true,
	"Proxy-Authorization": true,
	"Forwarded":           true,
	"X-Real-Ip":           true,
	"X-Client-Ip":         true,
	"True-Client-Ip":      true,
	"Cf-Connecting-Ip":    true,
	"Fastly-Client-Ip":    true,
	"X-Cluster-Client-Ip": true,
}

// Credential returns the client's credential (a team token) from wherever
// an SDK puts its API key: Authorization ("Bearer t", "Token t" or a bare
// "t"), X-Api-Key, Xi-Api-Key, X-Goog-Api-Key, the api_key or key query
// parameters, or, for WebSocket clients that cannot set headers, a
// "token, <t>" pair in Sec-WebSocket-Protocol. It returns "" when there is
// none. The same value in several places is fine; two different values
// are a 400 bad_request (an error the [Handler] answers as it is), which
// never echoes them.
func Credential(r *http.Request) (string, error) {
	var found string
	conflict := false
	add := func(v string) {
		v = strings.TrimSpace(v)
		switch {
		case v == "":
		case found == "":
			found = v
		case found != v:
			conflict = true
		}
	}
	for _, v := range r.Header.Values("Authorization") {
		add(authValue(v))
	}
	for _, name := range credentialHeaders[1:] {
		for _, v := range r.Header.Values(name) {
			add(v)
		}
	}
	if r.URL != nil && r.URL.RawQuery != "" {
		q := r.URL.Query()
		for _, name := range credentialParams {
			for _, v := range q[name] {
				add(v)
			}
		}
	}
	if t, ok := wsToken(r.Header); ok {
		add(t)
	}
	if conflict {
		return "", httpx.Errorf(http.StatusBadRequest, httpx.CodeBadRequest, "the request carries two different credentials; send one")
	}
	return found, nil
}

// CredentialContext is a request context that carries the client's
// credential as [Credential] read it from the same request before: a
// [Handler] serving a request whose context is one takes its Credential
// instead of reading the request again. keypoold's router reads the
// credential once to authenticate the caller and sends each attempt
// through the Handler on such a context. The credential must be the one
// the request carries: the Handler searches the path, query and body for
// it.
type CredentialContext interface {
	context.Context
	// Credential returns the request's credential ("" for none).
	Credential() string
}

// credentialOf returns the credential of r, whose context (before the
// Handler wrapped it) is ctx.
func credentialOf(ctx context.Context, r *http.Request) (string, error) {
	if c, ok := ctx.(CredentialContext); ok {
		return c.Credential(), nil
	}
	return Credential(r)
}

// authValue strips an Authorization value's Bearer or Token scheme.
func authValue(v string) string {
	v = strings.TrimSpace(v)
	for _, scheme := range []string{"Bearer ", "Token "} {
		if len(v) >= len(scheme) && strings.EqualFold(v[:len(scheme)], scheme) {
			return v[len(scheme):]
		}
	}
	return v
}

// wsProtocols returns the entries of every Sec-WebSocket-Protocol line.
func wsProtocols(h http.Header) []string {
	var out []string
	for _, line := range h.Values("Sec-WebSocket-Protocol") {
		for _, p := range strings.Split(line, ",") {
			if p = strings.TrimSpace(p); p != "" {
				out = append(out, p)
			}
		}
	}
	return out
}

// wsToken returns the token of a "token, <t>" Sec-WebSocket-Protocol pair.
func wsToken(h http.Header) (string, bool) {
	if len(h["Sec-Websocket-Protocol"]) == 0 {
		return "", false
	}
	ps := wsProtocols(h)
	for i, p := range ps {
		if p == "token" && i+1 < len(ps) {
			return ps[i+1], true
		}
	}
	return "", false
}

// stripInbound removes the client's credentials, cookies and forwarding
// headers from h (the deny-list documented on [Handler]).
func stripInbound(h http.Header) {
	for k := range h {
		if deniedHeaders[k] || deniedHeaders[http.CanonicalHeaderKey(k)] ||
			hasPrefixFold(k, "X-Forwarded-") || hasPrefixFold(k, "X-Keypool-") {
			delete(h, k)
		}
	}
	if _, ok := wsToken(h); ok {
		ps := wsProtocols(h)
		kept := make([]string, 0, len(ps))
		for i := 0; i < len(ps); i++ {
			if ps[i] == "token" && i+1 < len(ps) {
				i++ // and its value
				continue
			}
			kept = append(kept, ps[i])
		}
		if len(kept) == 0 {
			h.Del("Sec-WebSocket-Protocol")
		} else {
			h.Set("Sec-WebSocket-Protocol", strings.Join(kept, ", "))
		}
	}
}

func hasPrefixFold(s, prefix string) bool {
	return len(s) >= len(prefix) && strings.EqualFold(s[:len(prefix)], prefix)
}

// stripCredentialParams removes the credential query parameters, those
// that do not parse, and those whose name or value holds a spelling of
// the client's token (token may be nil). The parameters kept are returned
// as they came, in their order; a query without any to remove is returned
// unchanged, byte for byte.
func stripCredentialParams(raw string, token *patternSet) string {
	if raw == "" {
		return raw
	}
	m := newMatcher(token, nil)
	var kept []string
	dropped := false
	for rest := raw; rest != ""; {
		var piece string
		piece, rest, _ = strings.Cut(rest, "&")
		if piece == "" {
			kept = append(kept, piece)
			continue
		}
		k, v, _ := strings.Cut(piece, "=")
		name, err1 := url.QueryUnescape(k)
		val, err2 := url.QueryUnescape(v)
		if err1 != nil || err2 != nil || strings.IndexByte(piece, ';') >= 0 || isCredentialParam(name) ||
			hasMatch(&m, piece) || hasMatch(&m, name) || hasMatch(&m, val) {
			dropped = true
			continue
		}
		kept = append(kept, piece)
	}
	if !dropped {
		return raw
	}
	return strings.Join(kept, "&")
}

func isCredentialParam(name string) bool {
	for _, c := range credentialParams {
		if name == c {
			return true
		}
	}
	return false
}

func hasMatch(m *matcher, s string) bool {
	if m.empty() {
		return false
	}
	i, _ := m.findString(s)
	return i >= 0
}

// stripTokenHeaders removes every header whose name or value holds a
// spelling of the client's token, whatever the header is called (api-key,
// X-Auth-Token, Ocp-Apim-Subscription-Key, a custom one, X-Request-Id …).
func stripTokenHeaders(h http.Header, token *patternSet) {
	m := newMatcher(token, nil)
	if m.empty() {
		return
	}
	for k, vs := range h {
		if hasMatch(&m, k) {
			delete(h, k)
			continue
		}
		for _, v := range vs {
			if hasMatch(&m, v) {
				delete(h, k)
				break
			}
		}
	}
}

// errTokenInPath and errTokenInBody refuse requests that carry the client's
// own token where keypoold must forward it as it is. They never echo it.
var (
	errTokenInPath = httpx.Errorf(http.StatusBadRequest, httpx.CodeBadRequest,
		"the request path holds your keypool token; send the token only as your credential (Authorization, X-Api-Key, …), never inside the path")
	errTokenInBody = httpx.Errorf(http.StatusBadRequest, httpx.CodeBadRequest,
		"the request body holds your keypool token; keypoold forwards bodies as they are, so send the token only as your credential (Authorization, X-Api-Key, …)")
)

// checkTokenInPath refuses a path holding a spelling of the token.
func checkTokenInPath(rawPath string, token *patternSet) error {
	m := newMatcher(token, nil)
	if hasMatch(&m, rawPath) {
		return errTokenInPath
	}
	if dec, err := url.PathUnescape(rawPath); err == nil && dec != rawPath && hasMatch(&m, dec) {
		return errTokenInPath
	}
	return nil
}

// checkTokenInBody refuses a body holding a spelling of the token: as it
// is, and, when the body has escapes, with its JSON escapes (\u005f …) and
// its percent-encoding undone, so that no decoder upstream can read the
// token out of it.
func checkTokenInBody(body []byte, token *patternSet) error {
	m := newMatcher(token, nil)
	if m.empty() || len(body) == 0 {
		return nil
	}
	if i, _ := m.find(body); i >= 0 {
		return errTokenInBody
	}
	// The usual JSON escapes are among the token's spellings; only \u
	// escapes of ordinary characters and \/ need a decoded pass (bodies
	// with just \n and \" are common and do not).
	if bytes.Contains(body, []byte(`\u`)) || bytes.Contains(body, []byte(`\/`)) {
		if i, _ := m.find(jsonUnescape(body)); i >= 0 {
			return errTokenInBody
		}
	}
	if bytes.IndexByte(body, '%') >= 0 {
		if i, _ := m.find(percentDecode(body)); i >= 0 {
			return errTokenInBody
		}
	}
	return nil
}

// jsonUnescape undoes JSON string escapes wherever they appear in b (it
// does not parse b; other bytes are copied).
func jsonUnescape(b []byte) []byte {
	out := make([]byte, 0, len(b))
	for i := 0; i < len(b); i++ {
		c := b[i]
		if c != '\\' || i+1 >= len(b) {
			out = append(out, c)
			continue
		}
		i++
		switch e := b[i]; e {
		case 'u':
			if i+4 < len(b) {
				if r, err := strconv.ParseUint(string(b[i+1:i+5]), 16, 32); err == nil {
					out = utf8.AppendRune(out, rune(r))
					i += 4
					continue
				}
			}
			out = append(out, '\\', e)
		case 'n':
			out = append(out, '\n')
		case 't':
			out = append(out, '\t')
		case 'r':
			out = append(out, '\r')
		default:
			out = append(out, e)
		}
	}
	return out
}

// percentDecode undoes %XX escapes wherever they appear in b.
func percentDecode(b []byte) []byte {
	out := make([]byte, 0, len(b))
	for i := 0; i < len(b); i++ {
		if b[i] == '%' && i+2 < len(b) {
			if c, ok := unhex2(b[i+1], b[i+2]); ok {
				out = append(out, c)
				i += 2
				continue
			}
		}
		out = append(out, b[i])
	}
	return out
}
