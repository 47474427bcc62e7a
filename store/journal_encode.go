package store

import (
	"bytes"
	"hash/crc32"
	"math"
	"math/bits"
	"strconv"
	"strings"
	"time"
)

// Kinds of journal line.
const (
	lineFinal       = iota // a whole record
	lineProvisional        // a whole record, superseded by a later line with its ID
	lineDelta              // a final record as a change to its provisional line
)

// The journal's line format (format 2): the CRC-32C of the rest of the
// line in 8 hex digits, a space, the format digit '2', the kind ('F' a
// whole final record, 'P' a provisional record, 'D' a delta), then the
// fields, each after a tab, and a newline:
//
//	F, P: time id request_id team_id token_id service router key_id model
//	      status tokens_in tokens_out cached_tokens cost latency_ms key_spend
//	D:    time id changed request_id… status tokens_in tokens_out
//	      cached_tokens cost latency_ms key_spend
//
// time is Unix nanoseconds (empty for the zero time); numbers are decimal,
// a cost or spend with a fraction in plain decimal when 12 places or
// fewer write it exactly, else in Go's shortest form that reads back
// exactly; in strings a tab, newline or backslash is escaped as \t, \n,
// \\. A delta's changed is a bit set (decimal) of the string fields, in
// the order above from bit 0 (request_id) to bit 6 (model), that differ
// from its provisional line's; only those follow, in that order (an empty
// one clears the field). Lines of format 1 (JSON, with "P" or "D" before
// it for a provisional record or a delta) are replayed too
// (journal_replay.go).
const (
	formatCompact = '2'
	kindFinal     = 'F'
	kindProv      = 'P'
	kindDelta     = 'D'
	// compactWhole is the number of fields of a whole record.
	compactWhole = 16
	// compactNums is the number of numeric fields that end every line.
	compactNums = 7
)

// appendRecordLine appends the journal line of rec to b (format 2). A
// delta is the final record of a request whose provisional line is in
// the journal (rec.pseg is set): its ID, time and numbers, and only the
// string fields that differ from the provisional line's, which replay
// starts from. It is written by hand because it runs once per request.
func appendRecordLine(b []byte, rec *UsageRecord, kind int) []byte {
	start := len(b)
	b = appendUnsummedLine(b, rec, kind)
	sumLine(b[start:])
	return b
}

// appendUnsummedLine is appendRecordLine with the checksum left as
// "00000000": [sumLines] fills it in. A group's leader does that for all
// the group's lines, so that an appender's encoding buffer, which would
// escape into the checksum code, can live on its stack.
func appendUnsummedLine(b []byte, rec *UsageRecord, kind int) []byte {
	b = append(b, "00000000 2"...)
	switch kind {
	case lineProvisional:
		b = append(b, kindProv, '\t')
	case lineDelta:
		b = append(b, kindDelta, '\t')
	default:
		b = append(b, kindFinal, '\t')
	}
	if !rec.Time.IsZero() {
		if ns := rec.Time.UnixNano(); ns >= 0 {
			b = appendDecimal(b, uint64(ns))
		} else {
			b = append(b, '-')
			b = appendDecimal(b, uint64(-ns))
		}
	}
	b = appendCompactString(b, rec.ID)
	var changed uint8
	if kind == lineDelta {
		p := &rec.prov
		for i, c := range [...]bool{rec.RequestID != p.requestID, rec.TeamID != p.teamID, rec.TokenID != p.tokenID,
			rec.Service != p.service, rec.Router != p.router, rec.KeyID != p.keyID, rec.Model != p.model} {
			if c {
				changed |= 1 << i
			}
		}
		b = appendCompactInt(b, int64(changed))
	}
	// A delta line carries only the names that changed; the others, all.
	for i, v := range [...]string{rec.RequestID, rec.TeamID, rec.TokenID, rec.Service, rec.Router, rec.KeyID, rec.Model} {
		if kind != lineDelta || changed&(1<<i) != 0 {
			b = appendCompactString(b, v)
		}
	}
	b = appendCompactInt(b, int64(rec.Status))
	b = appendCompactInt(b, rec.TokensIn)
	b = appendCompactInt(b, rec.TokensOut)
	b = appendCompactInt(b, rec.CachedTokens)
	b = appendCompactFloat(b, rec.Cost)
	b = appendCompactInt(b, rec.LatencyMS)
	b = appendCompactFloat(b, rec.KeySpend)
	return append(b, '\n')
}

// sumLine fills in the checksum of one unsummed line (with its newline).
func sumLine(line []byte) {
	sum := crc32.Checksum(line[9:len(line)-1], crcTable)
	const hexDigits = "0123456789abcdef"
	for i := 7; i >= 0; i-- {
		line[i] = hexDigits[sum&0xf]
		sum >>= 4
	}
}

// sumLines fills in the checksums of unsummed lines; b holds whole lines
// (a string field escapes its newlines, so a line ends at the first).
func sumLines(b []byte) {
	for len(b) > 0 {
		n := bytes.IndexByte(b, '\n') + 1
		if n < 10 {
			return // not a line: never so, a group holds whole lines
		}
		sumLine(b[:n])
		b = b[n:]
	}
}

// appendCompactString appends a tab and s, its tabs, newlines and
// backslashes escaped.
func appendCompactString(b []byte, s string) []byte {
	b = append(b, '\t')
	for {
		i := plainPrefix(s)
		b = append(b, s[:i]...)
		if i == len(s) {
			return b
		}
		switch s[i] {
		case '\t':
			b = append(b, '\\', 't')
		case '\n':
			b = append(b, '\\', 'n')
		default:
			b = append(b, '\\', '\\')
		}
		s = s[i+1:]
	}
}

// plainPrefix returns the length of s's prefix that needs no escaping
// (all of it for ids, names and models), testing eight bytes at a time.
func plainPrefix(s string) int {
	n := len(s)
	if n < 8 {
		return plainBytes(s, 0)
	}
	for i := 0; ; i += 8 {
		if i > n-8 {
			i = n - 8 // the last eight bytes, overlapping the ones tested
		}
		if special8(s[i : i+8]) {
			return plainBytes(s, i)
		}
		if i == n-8 {
			return n
		}
	}
}

// special8 reports whether w, eight bytes, may hold a tab, newline or
// backslash: a byte below 0x20 or equal to '\\' sets its high bit in
// (x-0x20…) &^ x or in (y-0x01…) &^ y (y is x with '\\' bytes zeroed).
// Other control bytes pass too; plainBytes decides.
func special8(w string) bool {
	const ones, highs = 0x0101010101010101, 0x8080808080808080
	x := uint64(w[0]) | uint64(w[1])<<8 | uint64(w[2])<<16 | uint64(w[3])<<24 |
		uint64(w[4])<<32 | uint64(w[5])<<40 | uint64(w[6])<<48 | uint64(w[7])<<56
	y := x ^ ('\\' * ones)
	return ((x-0x20*ones)&^x|(y-ones)&^y)&highs != 0
}

// plainBytes returns the index of the first byte of s from i that needs
// escaping, or len(s).
func plainBytes(s string, i int) int {
	for ; i < len(s); i++ {
		if c := s[i]; c == '\t' || c == '\n' || c == '\\' {
			return i
		}
	}
	return i
}

// appendCompactInt appends a tab and v.
func appendCompactInt(b []byte, v int64) []byte {
	b = append(b, '\t')
	if v < 0 {
		b = append(b, '-')
		return appendDecimal(b, uint64(-v))
	}
	return appendDecimal(b, uint64(v))
}

// digitPairs holds "00" to "99".
const digitPairs = "00010203040506070809101112131415161718192021222324252627282930313233343536373839" +
	"40414243444546474849505152535455565758596061626364656667686970717273747576777879" +
	"8081828384858687888990919293949596979899"

// appendDecimal appends u in decimal. It is strconv.AppendUint without
// its base dispatch and copy: small numbers (most of a line's) take one
// append, larger ones are written two digits at a time.
func appendDecimal(b []byte, u uint64) []byte {
	if u < 10 {
		return append(b, byte('0'+u))
	}
	if u < 100 {
		return append(b, digitPairs[2*u], digitPairs[2*u+1])
	}
	var d [20]byte
	i := len(d)
	for u >= 100 {
		q := u / 100
		r := 2 * (u - 100*q)
		i -= 2
		d[i], d[i+1] = digitPairs[r], digitPairs[r+1]
		u = q
	}
	if u >= 10 {
		i -= 2
		d[i], d[i+1] = digitPairs[2*u], digitPairs[2*u+1]
	} else {
		i--
		d[i] = byte('0' + u)
	}
	return append(b, d[i:]...)
}

// appendCompactFloat appends a tab and v (0 for NaN and infinities): a
// whole number as an integer; a fraction that 12 decimal places or fewer
// write exactly, as prices make costs and spends, in plain decimal;
// else in Go's shortest form. Each reads back as v, and the first two
// cost a fraction of the shortest-form search.
func appendCompactFloat(b []byte, v float64) []byte {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return append(b, '\t', '0')
	}
	if v == math.Trunc(v) && math.Abs(v) < 1<<53 {
		return appendCompactInt(b, int64(v))
	}
	// m/1e12 and the parse of m's decimal with 12 places are both the
	// float nearest to m·10⁻¹² (m and 1e12 are exact: |m| < 2⁵³), so the
	// decimal reads back as v when m/1e12 is v.
	if math.Abs(v) < 1000 {
		if m := math.Round(v * 1e12); m/1e12 == v {
			return appendScaled(b, int64(m))
		}
	}
	b = append(b, '\t')
	return strconv.AppendFloat(b, v, 'g', -1, 64)
}

// appendScaled appends a tab and m·10⁻¹² in decimal, m not a multiple
// of 10¹², without trailing zeros.
func appendScaled(b []byte, m int64) []byte {
	b = append(b, '\t')
	u := uint64(m)
	if m < 0 {
		b = append(b, '-')
		u = uint64(-m)
	}
	b = appendDecimal(b, u/1e12)
	f := u % 1e12
	var d [13]byte
	d[0] = '.'
	for i := 12; i > 0; i -= 2 {
		r := 2 * (f % 100)
		d[i-1], d[i] = digitPairs[r], digitPairs[r+1]
		f /= 100
	}
	n := len(d)
	for d[n-1] == '0' {
		n--
	}
	return append(b, d[:n]...)
}

// decodeCompact decodes the fields of a format-2 line (each after a tab)
// into rec: a whole record into a zero rec, a delta into its provisional
// record. Invalid UTF-8 in a string becomes U+FFFD, as it did when lines
// were JSON.
func decodeCompact(body []byte, kind int, rec *UsageRecord) bool {
	f := bytes.Split(body, []byte{'\t'})[1:] // body starts with a tab
	if len(f) < 3+compactNums {
		return false
	}
	var t time.Time
	if len(f[0]) > 0 {
		ns, err := strconv.ParseInt(string(f[0]), 10, 64)
		if err != nil {
			return false
		}
		t = time.Unix(0, ns).UTC()
	}
	strs := [...]*string{&rec.RequestID, &rec.TeamID, &rec.TokenID, &rec.Service, &rec.Router, &rec.KeyID, &rec.Model}
	var changed uint64 = 1<<len(strs) - 1
	rest := f[2:]
	if kind == lineDelta {
		c, err := strconv.ParseUint(string(f[2]), 10, 8)
		if err != nil || c >= 1<<len(strs) {
			return false
		}
		changed, rest = c, f[3:]
	}
	if len(rest) != bits.OnesCount64(changed)+compactNums {
		return false
	}
	rec.Time, rec.ID = t, unescapeCompact(f[1])
	for i, p := range strs {
		if changed&(1<<i) != 0 {
			*p, rest = unescapeCompact(rest[0]), rest[1:]
		}
	}
	var n [compactNums]int64
	var x [2]float64
	for i, v := range rest {
		var err error
		switch i {
		case 4, 6: // cost, key_spend
			x[i/5], err = strconv.ParseFloat(string(v), 64)
		default:
			n[i], err = strconv.ParseInt(string(v), 10, 64)
		}
		if err != nil {
			return false
		}
	}
	rec.Status, rec.TokensIn, rec.TokensOut, rec.CachedTokens, rec.Cost, rec.LatencyMS, rec.KeySpend =
		int(n[0]), n[1], n[2], n[3], x[0], n[5], x[1]
	return true
}

// unescapeCompact returns the string of a format-2 field.
func unescapeCompact(v []byte) string {
	if bytes.IndexByte(v, '\\') < 0 {
		return strings.ToValidUTF8(string(v), "\uFFFD")
	}
	s := make([]byte, 0, len(v))
	for i := 0; i < len(v); i++ {
		c := v[i]
		if c == '\\' && i+1 < len(v) {
			i++
			switch v[i] {
			case 't':
				c = '\t'
			case 'n':
				c = '\n'
			default:
				c = v[i]
			}
		}
		s = append(s, c)
	}
	return strings.ToValidUTF8(string(s), "\uFFFD")
}
