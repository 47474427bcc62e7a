package keypool

import (
	"encoding/base64"
	"fmt"
	"net/http"
	"net/textproto"
	"net/url"
	"strings"
)

// AuthScheme puts an upstream key on a request the way that API expects.
// Inject must set the credential so that it is the only one of its kind on
// the request (replacing, never adding to, a header or query parameter of
// the same name).
type AuthScheme interface {
	// Inject adds the secret to r, which the caller owns (a clone).
	Inject(r *http.Request, secret Secret)
	// Name returns the scheme's config name, e.g. "bearer" or
	// "header:x-goog-api-key".
	Name() string
}

// HeaderAuth sets a header to Prefix + secret.
type HeaderAuth struct {
	// Header is the header name, e.g. "Authorization" or "x-api-key".
	Header string
	// Prefix goes before the secret, e.g. "Bearer ".
	Prefix string
	name   string
}

// Inject sets the header, replacing any value.
func (h HeaderAuth) Inject(r *http.Request, s Secret) {
	if r.Header == nil {
		r.Header = http.Header{}
	}
	r.Header.Set(h.Header, h.Prefix+s.Reveal())
}

// Name returns the scheme's config name.
func (h HeaderAuth) Name() string {
	if h.name != "" {
		return h.name
	}
	return "header:" + h.Header
}

// QueryAuth sets a query parameter to the secret.
type QueryAuth struct {
	// Param is the query parameter's name, e.g. "api_key" or "key".
	Param string
	name  string
}

// Inject rebuilds the query from its parsed values with Param set to the
// secret, so the injected key is the only value of Param.
func (q QueryAuth) Inject(r *http.Request, s Secret) {
	v := r.URL.Query()
	v.Set(q.Param, s.Reveal())
	u := *r.URL
	u.RawQuery = v.Encode()
	r.URL = &u
}

// Name returns the scheme's config name.
func (q QueryAuth) Name() string {
	if q.name != "" {
		return q.name
	}
	return "query:" + q.Param
}

// basicAuth is the scheme of [Basic].
type basicAuth struct{}

// Inject sets Authorization: Basic.
func (basicAuth) Inject(r *http.Request, s Secret) {
	if r.Header == nil {
		r.Header = http.Header{}
	}
	v := s.Reveal()
	if !strings.Contains(v, ":") {
		v += ":"
	}
	r.Header.Set("Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte(v)))
}

// Name returns "basic".
func (basicAuth) Name() string { return "basic" }

// Built-in auth schemes.
var (
	// Bearer sends Authorization: Bearer <key> (OpenAI, Groq, Firecrawl, Tavily).
	Bearer AuthScheme = HeaderAuth{Header: "Authorization", Prefix: "Bearer ", name: "bearer"}
	// XAPIKey sends x-api-key: <key> (Anthropic, Exa, Serper, Cartesia).
	XAPIKey AuthScheme = HeaderAuth{Header: "X-Api-Key", name: "x-api-key"}
	// XIAPIKey sends xi-api-key: <key> (ElevenLabs).
	XIAPIKey AuthScheme = HeaderAuth{Header: "Xi-Api-Key", name: "xi-api-key"}
	// AuthorizationRaw sends Authorization: <key> (AssemblyAI).
	AuthorizationRaw AuthScheme = HeaderAuth{Header: "Authorization", name: "authorization-raw"}
	// AuthorizationToken sends Authorization: Token <key> (Deepgram).
	AuthorizationToken AuthScheme = HeaderAuth{Header: "Authorization", Prefix: "Token ", name: "authorization-token"}
	// QueryParam sends ?api_key=<key>.
	QueryParam AuthScheme = QueryAuth{Param: "api_key", name: "query-param"}
	// Basic sends HTTP basic authentication. A secret containing a colon
	// is split into user and password at the first colon; otherwise the
	// secret is the user name and the password is empty (as Stripe-style
	// APIs expect).
	Basic AuthScheme = basicAuth{}
)

// AuthSchemeNames lists the fixed names [ParseAuthScheme] accepts, besides
// "header:<Name>" and "query:<name>".
var AuthSchemeNames = []string{"bearer", "x-api-key", "xi-api-key", "authorization-raw", "authorization-token", "query-param", "basic"}

// ParseAuthScheme returns the scheme named name: one of [AuthSchemeNames],
// "header:<Name>" for any header or "query:<name>" for any query parameter.
// "" means bearer.
func ParseAuthScheme(name string) (AuthScheme, error) {
	n := strings.TrimSpace(name)
	switch strings.ToLower(n) {
	case "", "bearer":
		return Bearer, nil
	case "x-api-key":
		return XAPIKey, nil
	case "xi-api-key":
		return XIAPIKey, nil
	case "authorization-raw":
		return AuthorizationRaw, nil
	case "authorization-token":
		return AuthorizationToken, nil
	case "query-param":
		return QueryParam, nil
	case "basic":
		return Basic, nil
	}
	kind, arg, ok := strings.Cut(n, ":")
	switch {
	case ok && strings.EqualFold(kind, "header") && ValidHeaderName(arg) && droppedHeader(arg):
		return nil, fmt.Errorf("%w: auth_scheme %q: %s cannot carry a key (HTTP clients and proxies set, drop or consume it); use the header the API documents, e.g. header:X-Api-Key",
			ErrInvalidConfig, name, textproto.CanonicalMIMEHeaderKey(arg))
	case ok && strings.EqualFold(kind, "header") && ValidHeaderName(arg):
		return HeaderAuth{Header: textproto.CanonicalMIMEHeaderKey(arg), name: "header:" + arg}, nil
	case ok && strings.EqualFold(kind, "query") && arg != "" && url.QueryEscape(arg) == arg:
		return QueryAuth{Param: arg, name: "query:" + arg}, nil
	}
	return nil, fmt.Errorf("%w: unknown auth_scheme %q (want one of %s, header:<Name> or query:<name>)",
		ErrInvalidConfig, name, strings.Join(AuthSchemeNames, ", "))
}

// droppedHeader reports whether a key set in the header name would not
// reach the upstream as sent: Host and the framing headers the transport
// writes itself, and the hop-by-hop headers proxies consume.
func droppedHeader(name string) bool {
	switch textproto.CanonicalMIMEHeaderKey(name) {
	case "Host", "Content-Length", "Transfer-Encoding", "Connection", "Upgrade", "Te", "Trailer", "Keep-Alive":
		return true
	}
	return len(name) >= 6 && strings.EqualFold(name[:6], "proxy-")
}

// ValidHeaderName reports whether v is a valid HTTP header name: an RFC
// 9110 token of at most 256 bytes. Auth schemes ("header:<Name>") and a
// service's proxy_headers follow this one rule.
func ValidHeaderName(v string) bool {
	if v == "" || len(v) > 256 {
		return false
	}
	for i := 0; i < len(v); i++ {
		c := v[i]
		if c <= ' ' || c >= 0x7f || strings.IndexByte("()<>@,;:\\\"/[]?={}", c) >= 0 {
			return false
		}
	}
	return true
}

var (
	_ AuthScheme = HeaderAuth{}
	_ AuthScheme = QueryAuth{}
	_ AuthScheme = basicAuth{}
)
