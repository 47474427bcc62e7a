package proxy

import (
	"net/http"
	"net/url"
	"strings"

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
// are a 400 bad_request (*httpx.Error), which never echoes them.
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

// stripCredentialParams removes the credential query parameters; a query
// without them is returned unchanged, byte for byte.
func stripCredentialParams(raw string) string {
	if raw == "" {
		return raw
	}
	q, err := url.ParseQuery(raw)
	found := false
	for _, name := range credentialParams {
		if _, ok := q[name]; ok {
			found = true
			delete(q, name)
		}
	}
	if !found && err == nil {
		return raw
	}
	return q.Encode()
}
