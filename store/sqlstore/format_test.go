package sqlstore

import (
	"fmt"
	"strings"
	"testing"
)

func TestStoreNeverPrintsSecrets(t *testing.T) {
	s := openAt(t, sqliteDSN(t), Options{Keyring: testKeyring(t)})
	if len(s.fpKey) == 0 {
		t.Fatal("no fingerprint key loaded")
	}
	for _, out := range []string{fmt.Sprint(s), fmt.Sprintf("%+v %#v %v %s", s, s, s, s)} {
		if strings.Contains(out, string(s.fpKey)) || strings.Contains(out, fmt.Sprint(s.fpKey)) || strings.Contains(out, "sqlite:") {
			t.Fatalf("store printed internals: %s", out)
		}
	}
}
