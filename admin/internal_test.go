package admin

import (
	"testing"

	"github.com/keypool/keypool"
)

func TestStateName(t *testing.T) {
	for st, want := range map[keypool.State]string{
		keypool.StateActive: "active", keypool.StateCooling: "cooling", keypool.StateOpen: "open",
		keypool.StateHalfOpen: "open", keypool.StateInvalid: "invalid", keypool.StateExhausted: "exhausted",
		keypool.StateDisabled: "disabled",
	} {
		if got := stateName(st); got != want {
			t.Errorf("stateName(%v) = %q, want %q", st, got, want)
		}
	}
}

func TestCSVSafe(t *testing.T) {
	for in, want := range map[string]string{"=cmd()": "'=cmd()", "+1": "'+1", "-x": "'-x", "@a": "'@a", "eng": "eng", "": ""} {
		if got := csvSafe(in); got != want {
			t.Errorf("csvSafe(%q) = %q, want %q", in, got, want)
		}
	}
}
