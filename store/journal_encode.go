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
// a cost or spend with a fraction in Go's shortest form that reads back
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
		b = strconv.AppendInt(b, rec.Time.UnixNano(), 10)
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
		b = append(b, '\t')
		b = strconv.AppendUint(b, uint64(changed), 10)
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
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case '\t':
			b = append(b, '\\', 't')
		case '\n':
			b = append(b, '\\', 'n')
		case '\\':
			b = append(b, '\\', '\\')
		default:
			// Copy the run of bytes that need no escaping at once: ids,
			// names and models have none.
			k := i + 1
			for k < len(s) && s[k] != '\t' && s[k] != '\n' && s[k] != '\\' {
				k++
			}
			b = append(b, s[i:k]...)
			i = k - 1
		}
	}
	return b
}

// appendCompactInt appends a tab and v.
func appendCompactInt(b []byte, v int64) []byte {
	b = append(b, '\t')
	return strconv.AppendInt(b, v, 10)
}

// appendCompactFloat appends a tab and v (0 for NaN and infinities).
func appendCompactFloat(b []byte, v float64) []byte {
	b = append(b, '\t')
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return append(b, '0')
	}
	if v == math.Trunc(v) && math.Abs(v) < 1<<53 {
		return strconv.AppendInt(b, int64(v), 10) // exact, and cheaper than the shortest-float search
	}
	return strconv.AppendFloat(b, v, 'g', -1, 64)
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
