package sso

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"time"
)

// Why a sign-in was refused before the provider was asked anything.
var (
	errStateMissing  = errors.New("the sign-in request has no state, or its cookie is missing")
	errStateTampered = errors.New("the sign-in state was altered or does not match this browser")
	errStateExpired  = errors.New("the sign-in took too long; its state has expired")
	errStateReplayed = errors.New("this sign-in link was already used")
)

// flow is what a sign-in in progress keeps in the browser, in the state
// cookie, MAC'd with the server's state secret: the state id the provider
// echoes, the PKCE verifier and the nonce.
type flow struct {
	ID       string `json:"i"`
	Verifier string `json:"v"`
	Nonce    string `json:"n"`
	Admin    bool   `json:"a,omitempty"`
	Expires  int64  `json:"e"`
}

// signer MACs and seals small values with keys derived from the state
// secret (one per purpose).
type signer struct {
	macKey  []byte
	sealKey []byte
}

func newSigner(secret []byte) signer {
	derive := func(purpose string) []byte {
		m := hmac.New(sha256.New, secret)
		m.Write([]byte("keypool-sso/" + purpose))
		return m.Sum(nil)
	}
	return signer{macKey: derive("mac"), sealKey: derive("seal")}
}

func (s signer) mac(kind, msg string) string {
	m := hmac.New(sha256.New, s.macKey)
	m.Write([]byte(kind + "\x00" + msg))
	return base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

// sign returns msg.MAC, where msg is base64url; kind separates uses.
func (s signer) sign(kind string, v any) (string, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return "", err
	}
	msg := base64.RawURLEncoding.EncodeToString(b)
	return msg + "." + s.mac(kind, msg), nil
}

// open checks a value from sign and decodes it into v.
func (s signer) open(kind, signed string, v any) bool {
	msg, sum, ok := strings.Cut(signed, ".")
	if !ok || !hmac.Equal([]byte(sum), []byte(s.mac(kind, msg))) {
		return false
	}
	b, err := base64.RawURLEncoding.DecodeString(msg)
	return err == nil && json.Unmarshal(b, v) == nil
}

// seal encrypts v (AES-256-GCM): for the new token on its way to its one
// showing, which must not be readable from the cookie.
func (s signer) seal(v any) (string, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return "", err
	}
	block, _ := aes.NewCipher(s.sealKey)
	gcm, _ := cipher.NewGCM(block)
	nonce := make([]byte, gcm.NonceSize())
	_, _ = rand.Read(nonce)
	return base64.RawURLEncoding.EncodeToString(gcm.Seal(nonce, nonce, b, []byte("keypool-sso-view"))), nil
}

func (s signer) unseal(sealed string, v any) bool {
	b, err := base64.RawURLEncoding.DecodeString(sealed)
	if err != nil {
		return false
	}
	block, _ := aes.NewCipher(s.sealKey)
	gcm, _ := cipher.NewGCM(block)
	if len(b) < gcm.NonceSize() {
		return false
	}
	plain, err := gcm.Open(nil, b[:gcm.NonceSize()], b[gcm.NonceSize():], []byte("keypool-sso-view"))
	return err == nil && json.Unmarshal(plain, v) == nil
}

// stateParam is the state sent to the provider: the flow id and its
// expiry, MAC'd, so that a forged or altered state is refused before the
// cookie is even read.
type stateParam struct {
	ID      string `json:"i"`
	Expires int64  `json:"e"`
}

// usedSet remembers ids (states, shown tokens) until they expire, so that
// each is accepted once. It is safe for concurrent use.
type usedSet struct {
	mu   sync.Mutex // protects seen
	seen map[string]time.Time
}

// take marks id used until exp; it reports false when id was used
// already. Expired ids are forgotten on the way.
func (u *usedSet) take(id string, exp, now time.Time) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.seen == nil {
		u.seen = map[string]time.Time{}
	}
	if len(u.seen) > 1024 {
		for k, t := range u.seen {
			if now.After(t) {
				delete(u.seen, k)
			}
		}
	}
	if _, ok := u.seen[id]; ok {
		return false
	}
	u.seen[id] = exp
	return true
}
