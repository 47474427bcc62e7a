package auth

import (
	"strings"
	"testing"
)

func TestPasswordHash(t *testing.T) {
	p := PasswordParams{MemoryKiB: 1024, Time: 1, Threads: 1}
	h, err := HashPassword("correct horse battery", p)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(h, "$argon2id$v=19$m=1024,t=1,p=1$") || strings.Contains(h, "correct") {
		t.Fatalf("hash = %q", h)
	}
	h2, _ := HashPassword("correct horse battery", p)
	if h == h2 {
		t.Error("two hashes of one password are equal: no salt")
	}
	cases := []struct {
		name, hash, pw string
		want           bool
	}{
		{"right", h, "correct horse battery", true},
		{"wrong", h, "correct horse batterz", false},
		{"empty", h, "", false},
		{"malformed", "$argon2id$v=19$m=1024,t=1,p=1$!!$!!", "correct horse battery", false},
		{"other algorithm", "$2a$10$abcdefghijklmnopqrstuv", "correct horse battery", false},
		{"absurd cost", strings.Replace(h, "m=1024", "m=99999999", 1), "correct horse battery", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := CheckPassword(c.hash, c.pw); got != c.want {
				t.Errorf("CheckPassword = %v, want %v", got, c.want)
			}
		})
	}
	for _, weak := range []string{"", "short", strings.Repeat("x", MaxPasswordLen+1)} {
		if _, err := HashPassword(weak, p); err != ErrWeakPassword {
			t.Errorf("HashPassword(%d chars) err = %v, want ErrWeakPassword", len(weak), err)
		}
	}
	g, err := GeneratePassword()
	if err != nil || len(g) != 24 {
		t.Fatalf("GeneratePassword = %q, %v", g, err)
	}
	if !IsSessionToken(SessionPrefix+strings.Repeat("a", 43)) || IsSessionToken("kp_"+strings.Repeat("a", 43)) || IsSessionToken("kps_x") {
		t.Error("IsSessionToken misjudges shapes")
	}
}
