package seal

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"
)

func mustKey(t *testing.T) string {
	t.Helper()
	k, err := GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func mustRing(t *testing.T, s string) *Keyring {
	t.Helper()
	kr, err := ParseKeyring(s)
	if err != nil {
		t.Fatal(err)
	}
	return kr
}

func TestSealOpen(t *testing.T) {
	k1, k2 := mustKey(t), mustKey(t)
	old := mustRing(t, k1)
	rotated := mustRing(t, k2+", "+k1)
	other := mustRing(t, k2)
	ad := []byte("key_1\x00openai")
	pt := []byte("sk-secret-value-123456")

	sealedOld, err := old.Seal(pt, ad)
	if err != nil {
		t.Fatal(err)
	}
	sealedNew, err := rotated.Seal(pt, ad)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(sealedOld, pt) {
		t.Fatal("ciphertext contains plaintext")
	}
	if v, _ := VersionOf(sealedNew); v != rotated.Current() || v != other.Current() {
		t.Fatalf("sealed with %s, want current %s", v, rotated.Current())
	}
	again, _ := old.Seal(pt, ad)
	if bytes.Equal(again, sealedOld) {
		t.Fatal("two seals are equal: nonce not random")
	}

	tampered := bytes.Clone(sealedOld)
	tampered[len(tampered)-1] ^= 1

	tests := []struct {
		name    string
		ring    *Keyring
		sealed  []byte
		ad      []byte
		wantErr error
	}{
		{"same key", old, sealedOld, ad, nil},
		{"old key still opens after rotation", rotated, sealedOld, ad, nil},
		{"new key", rotated, sealedNew, ad, nil},
		{"missing key", other, sealedOld, ad, ErrUnknownKey},
		{"old ring lacks new key", old, sealedNew, ad, ErrUnknownKey},
		{"other row", old, sealedOld, []byte("key_2\x00openai"), ErrOpen},
		{"tampered", old, tampered, ad, ErrOpen},
		{"short", old, sealedOld[:10], ad, ErrMalformed},
		{"plaintext is never accepted", old, append([]byte{0}, pt...), ad, ErrMalformed},
		{"nil keyring", nil, sealedOld, ad, ErrUnknownKey},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.ring.Open(tt.sealed, tt.ad)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			}
			if err == nil && !bytes.Equal(got, pt) {
				t.Fatalf("opened %q", got)
			}
			if err != nil {
				for _, k := range []string{k1, k2} {
					if strings.Contains(err.Error(), k) {
						t.Fatal("error contains key material")
					}
				}
				v, _ := VersionOf(tt.sealed)
				if tt.wantErr != ErrMalformed && !strings.Contains(err.Error(), v.String()) {
					t.Fatalf("error %q does not name key version %s", err, v)
				}
			}
		})
	}
}

func TestParseKeyring(t *testing.T) {
	k := mustKey(t)
	tests := []struct {
		name, in string
		ok       bool
	}{
		{"one", k, true},
		{"two", mustKey(t) + "," + k, true},
		{"short", k[:63], false},
		{"not hex", "g" + k[1:], false},
		{"empty", "", false},
		{"duplicate", k + "," + k, false},
		{"trailing comma", k + ",", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			kr, err := ParseKeyring(tt.in)
			if (err == nil) != tt.ok {
				t.Fatalf("err = %v, want ok=%v", err, tt.ok)
			}
			if err != nil {
				if !errors.Is(err, ErrBadKey) {
					t.Fatalf("err = %v, want ErrBadKey", err)
				}
				if strings.Contains(err.Error(), k[1:20]) {
					t.Fatal("error contains key material")
				}
				return
			}
			for _, s := range []string{fmt.Sprint(kr), fmt.Sprintf("%+v", kr), fmt.Sprintf("%#v", kr), fmt.Sprintf("%x", kr)} {
				if strings.Contains(s, k) || strings.Contains(s, k[:16]) {
					t.Fatalf("formatted keyring %q contains key material", s)
				}
			}
		})
	}
}

func BenchmarkOpen(b *testing.B) {
	k, _ := GenerateKey()
	kr, _ := ParseKeyring(k)
	ad := []byte("key_1\x00openai")
	s, _ := kr.Seal([]byte("sk-0123456789abcdef0123456789abcdef"), ad)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := kr.Open(s, ad); err != nil {
			b.Fatal(err)
		}
	}
}
