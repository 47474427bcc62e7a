package keypool

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"testing"
)

func TestSecretNeverPrints(t *testing.T) {
	s := Secret("sk-live-supersecret-9f2c")
	type cfg struct {
		Name string
		Key  Secret
	}
	var logBuf strings.Builder
	slog.New(slog.NewJSONHandler(&logBuf, nil)).Info("x", "key", s, "cfg", cfg{"a", s})
	js, _ := json.Marshal(cfg{"a", s})
	outs := []string{
		s.String(), fmt.Sprint(s), fmt.Sprintf("%v %+v %#v %s %q %x", s, s, s, s, s, s),
		fmt.Sprintf("%+v %#v", cfg{"a", s}, cfg{"a", s}), string(js), logBuf.String(),
		fmt.Errorf("wrap: %v", s).Error(),
	}
	for _, o := range outs {
		if strings.Contains(o, "supersecret") {
			t.Fatalf("secret leaked: %s", o)
		}
	}
	if s.Reveal() != "sk-live-supersecret-9f2c" {
		t.Fatal("Reveal")
	}
	for in, want := range map[string]string{"sk-abcdefghijklmnf9c2": "sk-a…f9c2", "short-key-12": "…12", "abc": "…", "": ""} {
		if got := Secret(in).Hint(); got != want {
			t.Errorf("Secret(%q).Hint() = %q, want %q", in, got, want)
		}
	}
}
