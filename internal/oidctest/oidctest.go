// Package oidctest is a small OpenID Connect provider for tests: discovery,
// a JWKS, an authorization endpoint with a consent page, and a token
// endpoint that checks the client secret, the redirect URI and PKCE, and
// accepts each code once. Its [Claims] let a test make the provider lie
// (wrong issuer or audience, an unverified email, a different nonce).
package oidctest

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"html/template"
	"net/http"
	"net/http/httptest"
	"net/url"
	"sync"
	"time"

	jose "github.com/go-jose/go-jose/v4"
)

// Claims are what the next ID tokens say. Zero fields take the honest
// value: the provider's issuer, the client id as audience, the nonce of
// the authorization request.
type Claims struct {
	Email         string
	EmailVerified bool
	Issuer        string
	Audience      string
	Nonce         string
	Groups        []string
}

type grant struct {
	redirect, challenge, nonce string
	claims                     Claims
	used                       bool
}

// Provider is a running test provider. Create it with [New].
type Provider struct {
	// ClientID and ClientSecret are the only client credentials accepted.
	ClientID, ClientSecret string

	srv    *httptest.Server
	key    *rsa.PrivateKey
	signer jose.Signer

	mu       sync.Mutex // protects what follows
	claims   Claims
	auto     bool
	down     bool
	codes    map[string]*grant
	tokenReq int
	lastIDT  string
}

// New starts a provider on 127.0.0.1; it stops with the test.
func New(cleanup func(func()), clientID, clientSecret string) *Provider {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		panic(err)
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.RS256, Key: jose.JSONWebKey{Key: key, KeyID: "k1"}},
		(&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		panic(err)
	}
	p := &Provider{ClientID: clientID, ClientSecret: clientSecret, key: key, signer: signer, codes: map[string]*grant{},
		claims: Claims{Email: "alice@example.com", EmailVerified: true}}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /.well-known/openid-configuration", p.discovery)
	mux.HandleFunc("GET /jwks", p.jwks)
	mux.HandleFunc("GET /authorize", p.authorize)
	mux.HandleFunc("POST /approve", p.approve)
	mux.HandleFunc("POST /token", p.token)
	p.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.mu.Lock()
		down := p.down
		p.mu.Unlock()
		if down {
			http.Error(w, "provider down", http.StatusServiceUnavailable)
			return
		}
		mux.ServeHTTP(w, r)
	}))
	cleanup(p.srv.Close)
	return p
}

// URL is the provider's issuer URL.
func (p *Provider) URL() string { return p.srv.URL }

// SetClaims sets what the next ID tokens say.
func (p *Provider) SetClaims(c Claims) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.claims = c
}

// SetAutoApprove makes /authorize redirect back at once, without the
// consent page.
func (p *Provider) SetAutoApprove(on bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.auto = on
}

// SetDown makes every endpoint answer 503 (a provider that is down).
func (p *Provider) SetDown(down bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = down
}

// LastIDToken returns the last ID token issued, for tests that check it
// leaks nowhere.
func (p *Provider) LastIDToken() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.lastIDT
}

// TokenRequests returns how many code exchanges were attempted.
func (p *Provider) TokenRequests() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.tokenReq
}

func (p *Provider) discovery(w http.ResponseWriter, r *http.Request) {
	u := p.srv.URL
	writeJSON(w, 200, map[string]any{
		"issuer": u, "authorization_endpoint": u + "/authorize", "token_endpoint": u + "/token",
		"jwks_uri": u + "/jwks", "response_types_supported": []string{"code"},
		"subject_types_supported": []string{"public"}, "id_token_signing_alg_values_supported": []string{"RS256"},
		"code_challenge_methods_supported": []string{"S256"},
	})
}

func (p *Provider) jwks(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, 200, jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: &p.key.PublicKey, KeyID: "k1", Algorithm: "RS256", Use: "sig"}}})
}

var consent = template.Must(template.New("c").Parse(`<!doctype html><html><head><title>Fake provider consent</title></head><body>
<h1>Sign in to keypool?</h1><p id="who">{{.Email}}</p>
<form method="post" action="/approve">{{range $k, $v := .Params}}<input type="hidden" name="{{$k}}" value="{{$v}}">{{end}}
<button id="approve" type="submit">Approve</button></form></body></html>`))

func (p *Provider) authorize(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	if q.Get("client_id") != p.ClientID || q.Get("response_type") != "code" || q.Get("code_challenge_method") != "S256" || q.Get("code_challenge") == "" {
		http.Error(w, "bad authorization request", http.StatusBadRequest)
		return
	}
	p.mu.Lock()
	auto, email := p.auto, p.claims.Email
	p.mu.Unlock()
	params := map[string]string{}
	for _, k := range []string{"redirect_uri", "state", "nonce", "code_challenge"} {
		params[k] = q.Get(k)
	}
	if auto {
		p.redirectWithCode(w, r, params)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	_ = consent.Execute(w, map[string]any{"Email": email, "Params": params})
}

func (p *Provider) approve(w http.ResponseWriter, r *http.Request) {
	_ = r.ParseForm()
	params := map[string]string{}
	for _, k := range []string{"redirect_uri", "state", "nonce", "code_challenge"} {
		params[k] = r.PostForm.Get(k)
	}
	p.redirectWithCode(w, r, params)
}

func (p *Provider) redirectWithCode(w http.ResponseWriter, r *http.Request, params map[string]string) {
	code := rand.Text()
	p.mu.Lock()
	p.codes[code] = &grant{redirect: params["redirect_uri"], challenge: params["code_challenge"], nonce: params["nonce"], claims: p.claims}
	p.mu.Unlock()
	u, err := url.Parse(params["redirect_uri"])
	if err != nil {
		http.Error(w, "bad redirect_uri", http.StatusBadRequest)
		return
	}
	v := u.Query()
	v.Set("code", code)
	v.Set("state", params["state"])
	u.RawQuery = v.Encode()
	http.Redirect(w, r, u.String(), http.StatusFound)
}

func (p *Provider) token(w http.ResponseWriter, r *http.Request) {
	_ = r.ParseForm()
	p.mu.Lock()
	p.tokenReq++
	p.mu.Unlock()
	id, secret, ok := r.BasicAuth()
	if !ok {
		id, secret = r.PostForm.Get("client_id"), r.PostForm.Get("client_secret")
	}
	if id != p.ClientID || secret != p.ClientSecret {
		writeJSON(w, 401, map[string]string{"error": "invalid_client"})
		return
	}
	p.mu.Lock()
	g := p.codes[r.PostForm.Get("code")]
	replay := g != nil && g.used
	if g != nil {
		g.used = true
	}
	p.mu.Unlock()
	sum := sha256.Sum256([]byte(r.PostForm.Get("code_verifier")))
	switch {
	case g == nil || replay:
		writeJSON(w, 400, map[string]string{"error": "invalid_grant", "error_description": "unknown or used code"})
		return
	case g.redirect != r.PostForm.Get("redirect_uri"):
		writeJSON(w, 400, map[string]string{"error": "invalid_grant", "error_description": "redirect_uri mismatch"})
		return
	case base64.RawURLEncoding.EncodeToString(sum[:]) != g.challenge:
		writeJSON(w, 400, map[string]string{"error": "invalid_grant", "error_description": "PKCE verification failed"})
		return
	}
	c := g.claims
	iss, aud, nonce := p.srv.URL, p.ClientID, g.nonce
	if c.Issuer != "" {
		iss = c.Issuer
	}
	if c.Audience != "" {
		aud = c.Audience
	}
	if c.Nonce != "" {
		nonce = c.Nonce
	}
	now := time.Now()
	claims := map[string]any{"iss": iss, "aud": aud, "sub": "sub-" + c.Email, "email": c.Email, "email_verified": c.EmailVerified,
		"nonce": nonce, "iat": now.Unix(), "exp": now.Add(time.Hour).Unix()}
	if len(c.Groups) > 0 {
		claims["groups"] = c.Groups
	}
	b, _ := json.Marshal(claims)
	obj, err := p.signer.Sign(b)
	if err != nil {
		http.Error(w, err.Error(), 500)
		return
	}
	idt, _ := obj.CompactSerialize()
	p.mu.Lock()
	p.lastIDT = idt
	p.mu.Unlock()
	writeJSON(w, 200, map[string]any{"access_token": "at-" + rand.Text(), "token_type": "Bearer", "expires_in": 3600, "id_token": idt})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	if err := json.NewEncoder(w).Encode(v); err != nil {
		fmt.Println("oidctest:", err)
	}
}
