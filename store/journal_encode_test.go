package store

import (
	"math"
	"math/rand/v2"
	"strconv"
	"strings"
	"testing"
)

// TestJournalNumberForm: a fractional cost or spend is written in plain
// decimal when 12 places or fewer write it exactly, else in Go's shortest
// form; either way it reads back as the same float. Integers read back
// as themselves.
func TestJournalNumberForm(t *testing.T) {
	for _, c := range []struct {
		v    float64
		want string
	}{
		{0.5, "0.5"},
		{0.001, "0.001"},
		{4.13e-05, "0.0000413"},
		{12 * 0.15 / 1e6, "0.0000018"},
		{-0.25, "-0.25"},
		{123.456, "123.456"},
		{1e-12, "0.000000000001"},
		{3, "3"},
		{-1, "-1"},
		{0, "0"},
		{1.0 / 3, "0.3333333333333333"},
		{1e-13, "1e-13"},
		{1234.5, "1234.5"},
		{math.Inf(1), "0"},
		{math.NaN(), "0"},
	} {
		got := string(appendCompactFloat(nil, c.v))
		if got != "\t"+c.want {
			t.Errorf("%v written as %q, want %q", c.v, got, "\t"+c.want)
		}
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 200000 {
		var v float64
		switch i % 4 {
		case 0: // a token count times a price per million, as costs are made
			v = float64(rng.IntN(100000)) * []float64{0.15, 0.6, 2.5, 10, 0.075}[rng.IntN(5)] / 1e6
		case 1:
			v = rng.Float64() * math.Pow(10, float64(rng.IntN(8)-5))
		case 2:
			v = -float64(rng.IntN(1e9)) / 1e9
		default:
			v = math.Float64frombits(rng.Uint64() >> 2) // any magnitude
		}
		s := string(appendCompactFloat(nil, v)[1:])
		back, err := strconv.ParseFloat(s, 64)
		if err != nil || back != v {
			t.Fatalf("%v (%x) written as %q reads back as %v, %v", v, math.Float64bits(v), s, back, err)
		}
	}
	for _, v := range []int64{0, 9, 10, 99, 100, 101, 999, 1000, 1764583200123456789, math.MaxInt64, math.MinInt64, -1, -100} {
		if got, want := string(appendCompactInt(nil, v)), "\t"+strconv.FormatInt(v, 10); got != want {
			t.Errorf("%d written as %q, want %q", v, got, want)
		}
	}
	for range 100000 {
		v := int64(rng.Uint64()) >> rng.IntN(64)
		if got, want := string(appendCompactInt(nil, v)), "\t"+strconv.FormatInt(v, 10); got != want {
			t.Fatalf("%d written as %q, want %q", v, got, want)
		}
	}
}

// TestPlainPrefix: the eight-bytes-at-a-time scan stops where a byte-wise
// scan does, for each byte that needs escaping (and bytes next to them in
// value) at each position of strings of each length up to 40; and such
// strings round-trip through a line.
func TestPlainPrefix(t *testing.T) {
	naive := func(s string) int {
		for i := 0; i < len(s); i++ {
			if c := s[i]; c == '\t' || c == '\n' || c == '\\' {
				return i
			}
		}
		return len(s)
	}
	for n := range 41 {
		base := strings.Repeat("a", n)
		if got := plainPrefix(base); got != n {
			t.Fatalf("plainPrefix(%q) = %d, want %d", base, got, n)
		}
		for i := range n {
			for _, c := range []byte{'\t', '\n', '\\', 0, 8, 11, 0x1f, ' ', '[', ']', 0x7f, 0x80, 0xdc, 0xff} {
				s := base[:i] + string([]byte{c}) + base[i+1:]
				if got, want := plainPrefix(s), naive(s); got != want {
					t.Fatalf("plainPrefix(%q) = %d, want %d", s, got, want)
				}
				if i+1 < n { // and a second special byte after it
					s2 := s[:i+1] + "\\" + s[i+2:]
					if got, want := plainPrefix(s2), naive(s2); got != want {
						t.Fatalf("plainPrefix(%q) = %d, want %d", s2, got, want)
					}
				}
			}
		}
	}
	r := UsageRecord{Model: "a\\b\tc\nd" + strings.Repeat("x", 9) + "\x01\\"}
	got, _, ok := decodeRecord(appendRecordLine(nil, &r, lineFinal))
	if !ok || got.Model != r.Model {
		t.Fatalf("model %q round-trips as %q (ok %v)", r.Model, got.Model, ok)
	}
}
