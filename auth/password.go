package auth

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"

	"golang.org/x/crypto/argon2"
)

// PasswordParams are the argon2id cost parameters of new password hashes.
// Zero fields pick the defaults (OWASP's second recommended set: 19 MiB,
// 2 passes, 1 lane). A stored hash carries its own parameters, so raising
// them later does not lock anyone out.
type PasswordParams struct {
	// MemoryKiB is the memory cost in KiB. If zero, 19456.
	MemoryKiB uint32 `json:"memory_kib,omitempty"`
	// Time is the number of passes. If zero, 2.
	Time uint32 `json:"time,omitempty"`
	// Threads is the degree of parallelism. If zero, 1.
	Threads uint8 `json:"threads,omitempty"`
}

func (p PasswordParams) withDefaults() PasswordParams {
	if p.MemoryKiB == 0 {
		p.MemoryKiB = 19456
	}
	if p.Time == 0 {
		p.Time = 2
	}
	if p.Threads == 0 {
		p.Threads = 1
	}
	return p
}

// Password length bounds, in bytes.
const (
	MinPasswordLen = 8
	MaxPasswordLen = 256
)

// ErrWeakPassword is returned by [HashPassword] for a password shorter
// than [MinPasswordLen] or longer than [MaxPasswordLen].
var ErrWeakPassword = fmt.Errorf("auth: a password must be %d to %d characters long", MinPasswordLen, MaxPasswordLen)

const (
	saltLen = 16
	keyLen  = 32
)

var b64 = base64.RawStdEncoding

// HashPassword returns the encoded argon2id hash of password, in the
// usual "$argon2id$v=19$m=…,t=…,p=…$salt$hash" form, with a random salt.
func HashPassword(password string, p PasswordParams) (string, error) {
	if len(password) < MinPasswordLen || len(password) > MaxPasswordLen {
		return "", ErrWeakPassword
	}
	return hashPassword(password, p.withDefaults())
}

func hashPassword(password string, p PasswordParams) (string, error) {
	salt := make([]byte, saltLen)
	if _, err := rand.Read(salt); err != nil {
		return "", fmt.Errorf("auth: generate salt: %w", err)
	}
	key := argon2.IDKey([]byte(password), salt, p.Time, p.MemoryKiB, p.Threads, keyLen)
	return fmt.Sprintf("$argon2id$v=%d$m=%d,t=%d,p=%d$%s$%s", argon2.Version, p.MemoryKiB, p.Time, p.Threads,
		b64.EncodeToString(salt), b64.EncodeToString(key)), nil
}

var errBadHash = errors.New("auth: malformed password hash")

// CheckPassword reports whether password matches the encoded hash. The
// comparison is constant-time; a malformed hash matches nothing.
func CheckPassword(encoded, password string) bool {
	p, salt, key, err := decodeHash(encoded)
	if err != nil || len(password) > MaxPasswordLen {
		return false
	}
	got := argon2.IDKey([]byte(password), salt, p.Time, p.MemoryKiB, p.Threads, uint32(len(key)))
	return subtle.ConstantTimeCompare(got, key) == 1
}

func decodeHash(encoded string) (p PasswordParams, salt, key []byte, err error) {
	parts := strings.Split(encoded, "$")
	if len(parts) != 6 || parts[0] != "" || parts[1] != "argon2id" {
		return p, nil, nil, errBadHash
	}
	var v int
	if _, err := fmt.Sscanf(parts[2], "v=%d", &v); err != nil || v != argon2.Version {
		return p, nil, nil, errBadHash
	}
	if _, err := fmt.Sscanf(parts[3], "m=%d,t=%d,p=%d", &p.MemoryKiB, &p.Time, &p.Threads); err != nil {
		return p, nil, nil, errBadHash
	}
	// Bound the cost a stored hash can ask for (1 GiB, 16 passes).
	if p.MemoryKiB == 0 || p.MemoryKiB > 1<<20 || p.Time == 0 || p.Time > 16 || p.Threads == 0 {
		return p, nil, nil, errBadHash
	}
	if salt, err = b64.DecodeString(parts[4]); err != nil || len(salt) < 8 {
		return p, nil, nil, errBadHash
	}
	if key, err = b64.DecodeString(parts[5]); err != nil || len(key) < 16 || len(key) > 64 {
		return p, nil, nil, errBadHash
	}
	return p, salt, key, nil
}

// GeneratePassword returns a random password of 24 base62 characters
// (about 143 bits), for a first admin user.
func GeneratePassword() (string, error) {
	t, _, _, err := NewToken()
	if err != nil {
		return "", err
	}
	return t[len(TokenPrefix) : len(TokenPrefix)+24], nil
}
