// Package seal encrypts small secrets at rest with AES-256-GCM under a
// [Keyring] of one or more 256-bit keys.
//
// The first key of a keyring seals; every key opens, so keys can be rotated:
// put the new key first, keep the old ones after it until every sealed value
// has been re-sealed (sqlstore's Rewrap), then drop them.
//
// A sealed value is self-describing:
//
//	byte 0      format (1)
//	bytes 1..4  key version (big endian), see [KeyVersion]
//	bytes 5..16 random 96-bit nonce
//	bytes 17..  AES-256-GCM ciphertext and 16-byte tag
//
// Associated data given to [Keyring.Seal] must be given again to
// [Keyring.Open]; callers bind a value to its row that way, so a ciphertext
// copied to another row does not open.
//
// Opening never falls back to plaintext: a value sealed with a key the
// keyring does not hold, a wrong key or tampered data fail with an error that
// names the key version. Key material never appears in an error, a log line
// or a formatted Keyring.
//
// A Keyring is immutable and safe for concurrent use.
package seal

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strings"
)

// KeySize is the size of an encryption key in bytes (AES-256).
const KeySize = 32

const (
	formatV1   = 1
	headerSize = 1 + 4 + 12
	tagSize    = 16
)

// Errors returned by this package, wrapped with %w; test them with errors.Is.
var (
	// ErrUnknownKey means a value was sealed with a key the keyring does
	// not hold.
	ErrUnknownKey = errors.New("seal: encryption key not in keyring")
	// ErrOpen means a value failed authentication: a wrong key, tampered
	// data, or data moved to another row (different associated data).
	ErrOpen = errors.New("seal: message authentication failed")
	// ErrMalformed means a value is too short or of an unknown format.
	ErrMalformed = errors.New("seal: malformed sealed value")
	// ErrBadKey means an encryption key could not be parsed or has the
	// wrong size.
	ErrBadKey = errors.New("seal: bad encryption key")
)

// KeyVersion identifies a key of a keyring: the first four bytes of an
// HMAC-SHA256 of a fixed label under the key. It does not depend on the
// key's position in the list, so reordering or adding keys never changes
// it, and it reveals nothing usable about the key.
type KeyVersion uint32

// String returns the version as eight hex digits.
func (v KeyVersion) String() string { return fmt.Sprintf("%08x", uint32(v)) }

type ringKey struct {
	version KeyVersion
	aead    cipher.AEAD
}

// Keyring holds the keys that seal and open values. The zero value holds no
// key and cannot seal; use [NewKeyring] or [ParseKeyring].
type Keyring struct {
	keys []ringKey // immutable; keys[0] seals
}

// NewKeyring returns a keyring of the given 32-byte keys. The first key
// seals; the others only open. The keyring keeps no copy of the key bytes
// beyond the AES key schedule.
func NewKeyring(keys ...[]byte) (*Keyring, error) {
	if len(keys) == 0 {
		return nil, fmt.Errorf("%w: no key given", ErrBadKey)
	}
	kr := &Keyring{keys: make([]ringKey, 0, len(keys))}
	for i, k := range keys {
		if len(k) != KeySize {
			return nil, fmt.Errorf("%w: key %d of %d: want %d bytes, got %d", ErrBadKey, i+1, len(keys), KeySize, len(k))
		}
		block, err := aes.NewCipher(k)
		if err != nil {
			return nil, fmt.Errorf("%w: key %d of %d: %w", ErrBadKey, i+1, len(keys), err)
		}
		aead, err := cipher.NewGCM(block)
		if err != nil {
			return nil, fmt.Errorf("%w: key %d of %d: %w", ErrBadKey, i+1, len(keys), err)
		}
		v := versionOf(k)
		if kr.Has(v) {
			return nil, fmt.Errorf("%w: key %d of %d (version %s) is listed twice", ErrBadKey, i+1, len(keys), v)
		}
		kr.keys = append(kr.keys, ringKey{version: v, aead: aead})
	}
	return kr, nil
}

// ParseKeyring parses a comma-separated list of keys, each 64 hex
// characters (the format of KEYPOOL_ENCRYPTION_KEY). Spaces around keys are
// ignored. The first key seals. Errors name a key by its position, never by
// its value.
func ParseKeyring(s string) (*Keyring, error) {
	parts := strings.Split(s, ",")
	keys := make([][]byte, 0, len(parts))
	for i, p := range parts {
		p = strings.TrimSpace(p)
		if len(p) != 2*KeySize {
			return nil, fmt.Errorf("%w: key %d of %d: want %d hex characters, got %d", ErrBadKey, i+1, len(parts), 2*KeySize, len(p))
		}
		k, err := hex.DecodeString(p)
		if err != nil {
			// The hex error quotes the offending character: do not wrap it.
			return nil, fmt.Errorf("%w: key %d of %d: not hexadecimal", ErrBadKey, i+1, len(parts))
		}
		keys = append(keys, k)
	}
	return NewKeyring(keys...)
}

// GenerateKey returns a new random key as 64 hex characters, the format
// [ParseKeyring] reads.
func GenerateKey() (string, error) {
	var k [KeySize]byte
	if _, err := rand.Read(k[:]); err != nil {
		return "", fmt.Errorf("seal: generate key: %w", err)
	}
	return hex.EncodeToString(k[:]), nil
}

func versionOf(key []byte) KeyVersion {
	m := hmac.New(sha256.New, key)
	m.Write([]byte("keypool/seal/key-version/v1"))
	return KeyVersion(binary.BigEndian.Uint32(m.Sum(nil)))
}

// Current returns the version of the key that seals.
func (k *Keyring) Current() KeyVersion {
	if k == nil || len(k.keys) == 0 {
		return 0
	}
	return k.keys[0].version
}

// Versions returns the versions of every key, the sealing key first.
func (k *Keyring) Versions() []KeyVersion {
	if k == nil {
		return nil
	}
	vs := make([]KeyVersion, len(k.keys))
	for i, rk := range k.keys {
		vs[i] = rk.version
	}
	return vs
}

// Has reports whether the keyring holds the key of version v.
func (k *Keyring) Has(v KeyVersion) bool {
	return k.find(v) != nil
}

func (k *Keyring) find(v KeyVersion) cipher.AEAD {
	if k == nil {
		return nil
	}
	for _, rk := range k.keys {
		if rk.version == v {
			return rk.aead
		}
	}
	return nil
}

// Seal encrypts plaintext with the current key and a fresh random nonce,
// binding it to ad (which is authenticated, not stored).
func (k *Keyring) Seal(plaintext, ad []byte) ([]byte, error) {
	if k == nil || len(k.keys) == 0 {
		return nil, fmt.Errorf("%w: keyring is empty", ErrUnknownKey)
	}
	cur := k.keys[0]
	out := make([]byte, headerSize, headerSize+len(plaintext)+tagSize)
	out[0] = formatV1
	binary.BigEndian.PutUint32(out[1:5], uint32(cur.version))
	if _, err := rand.Read(out[5:headerSize]); err != nil {
		return nil, fmt.Errorf("seal: nonce: %w", err)
	}
	return cur.aead.Seal(out, out[5:headerSize], plaintext, ad), nil
}

// Open decrypts a value made by [Keyring.Seal] with the same ad. It fails
// with [ErrUnknownKey] when the keyring lacks the value's key, [ErrOpen]
// when authentication fails and [ErrMalformed] for anything else; each
// error names the key version.
func (k *Keyring) Open(sealed, ad []byte) ([]byte, error) {
	v, err := VersionOf(sealed)
	if err != nil {
		return nil, err
	}
	aead := k.find(v)
	if aead == nil {
		return nil, fmt.Errorf("%w: value sealed with key version %s; keyring holds %s", ErrUnknownKey, v, k.versionList())
	}
	pt, err := aead.Open(nil, sealed[5:headerSize], sealed[headerSize:], ad)
	if err != nil {
		return nil, fmt.Errorf("%w (key version %s)", ErrOpen, v)
	}
	return pt, nil
}

// VersionOf returns the version of the key that sealed a value.
func VersionOf(sealed []byte) (KeyVersion, error) {
	if len(sealed) < headerSize+tagSize {
		return 0, fmt.Errorf("%w: %d bytes", ErrMalformed, len(sealed))
	}
	if sealed[0] != formatV1 {
		return 0, fmt.Errorf("%w: unknown format %d", ErrMalformed, sealed[0])
	}
	return KeyVersion(binary.BigEndian.Uint32(sealed[1:5])), nil
}

func (k *Keyring) versionList() string {
	vs := k.Versions()
	if len(vs) == 0 {
		return "no key"
	}
	s := make([]string, len(vs))
	for i, v := range vs {
		s[i] = v.String()
	}
	return strings.Join(s, ", ")
}

// String describes the keyring by key versions only.
func (k *Keyring) String() string {
	if k == nil {
		return "seal.Keyring(nil)"
	}
	return "seal.Keyring{" + k.versionList() + "}"
}

// GoString describes the keyring by key versions only.
func (k *Keyring) GoString() string { return k.String() }

// Format writes [Keyring.String] for every verb, so no key schedule is
// ever printed.
func (k *Keyring) Format(f fmt.State, _ rune) { _, _ = f.Write([]byte(k.String())) }

// LogValue makes log/slog print [Keyring.String].
func (k *Keyring) LogValue() slog.Value { return slog.StringValue(k.String()) }
