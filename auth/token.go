package auth

import (
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"math/big"
	"strings"
)

// TokenPrefix starts every client token, so that a leaked token is easy to
// recognise (secret scanners, log scrubbers) and an admin token or an
// upstream key sent by mistake is rejected without a store lookup.
const TokenPrefix = "kp_"

// tokenBytes is how much randomness a token carries.
const tokenBytes = 32

// tokenBodyLen is the length of the base62 text of tokenBytes random
// bytes: ceil(256 / log2(62)) = 43.
const tokenBodyLen = 43

// PrefixLen is how many leading characters of a token are kept as its
// [store.Token] Prefix ("kp_" and five random characters): enough to tell
// tokens apart in a listing, far too few to guess the rest.
const PrefixLen = 8

// NewToken returns a new client token, "kp_" followed by 43 base62
// characters of 32 bytes from crypto/rand; its prefix for listings (the
// first [PrefixLen] characters); and its hash, the only form that is
// stored.
//
// The hash is a plain SHA-256 on purpose: a token holds 256 random bits, so
// there is nothing for a slow password hash (bcrypt, argon2) to protect
// against, and a fast hash keeps every authenticated request cheap.
func NewToken() (token, prefix string, hash []byte, err error) {
	var b [tokenBytes]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", "", nil, fmt.Errorf("auth: generate token: %w", err)
	}
	body := new(big.Int).SetBytes(b[:]).Text(62)
	if len(body) < tokenBodyLen {
		body = strings.Repeat("0", tokenBodyLen-len(body)) + body
	}
	token = TokenPrefix + body
	return token, token[:PrefixLen], Hash(token), nil
}

// Hash returns the SHA-256 of a token: the form [store.Token] keeps and
// [store.Store.GetTokenByHash] looks up.
func Hash(token string) []byte {
	h := sha256.Sum256([]byte(token))
	return h[:]
}

// wellFormed reports whether token looks like one [NewToken] made, so that
// garbage (an upstream key, the admin token, a typo) never reaches the
// store.
func wellFormed(token string) bool {
	if len(token) != len(TokenPrefix)+tokenBodyLen || !strings.HasPrefix(token, TokenPrefix) {
		return false
	}
	for i := len(TokenPrefix); i < len(token); i++ {
		c := token[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z') {
			return false
		}
	}
	return true
}
