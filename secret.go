package keypool

import (
	"fmt"
	"log/slog"
)

// Secret is an upstream credential. Every way of printing it (String,
// GoString, Format with any verb, MarshalJSON, MarshalText, LogValue)
// redacts it, so a Secret that reaches a log line, an error or a JSON
// document by accident shows "[redacted]". Call [Secret.Reveal] at the one
// place the value must leave the process: the auth scheme that injects it.
type Secret string

const redacted = "[redacted]"

// Reveal returns the secret's plaintext value.
func (s Secret) Reveal() string { return string(s) }

// String returns a redacted placeholder, never the value.
func (s Secret) String() string { return redacted }

// GoString returns a redacted placeholder, never the value.
func (s Secret) GoString() string { return redacted }

// Format writes a redacted placeholder for every verb.
func (s Secret) Format(f fmt.State, _ rune) { _, _ = f.Write([]byte(redacted)) }

// MarshalJSON encodes a redacted placeholder.
func (s Secret) MarshalJSON() ([]byte, error) { return []byte(`"` + redacted + `"`), nil }

// MarshalText encodes a redacted placeholder.
func (s Secret) MarshalText() ([]byte, error) { return []byte(redacted), nil }

// LogValue makes log/slog print a redacted placeholder.
func (s Secret) LogValue() slog.Value { return slog.StringValue(redacted) }

// IsZero reports whether the secret is empty.
func (s Secret) IsZero() bool { return s == "" }

// Hint returns a masked form safe for listings: the first four and last four
// characters around an ellipsis ("sk-a…f9c2"). Secrets of twelve characters
// or fewer show only their last two ("…c2"), and empty ones show "".
func (s Secret) Hint() string {
	v := string(s)
	switch {
	case v == "":
		return ""
	case len(v) <= 12:
		if len(v) <= 4 {
			return "…"
		}
		return "…" + v[len(v)-2:]
	default:
		return v[:4] + "…" + v[len(v)-4:]
	}
}
