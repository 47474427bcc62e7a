package store

import (
	"bytes"
	"hash/crc32"
	"math"
	"strconv"
	"time"
	"unicode/utf8"
)

// Kinds of journal line.
const (
	lineFinal       = iota // a whole record
	lineProvisional        // a whole record, superseded by a later line with its ID
	lineDelta              // a final record as a change to its provisional line
)

// appendRecordLine appends the journal line of rec to b: the CRC-32C of
// the rest of the line in 8 hex digits, a space, "P" for a provisional
// record or "D" for a delta, the JSON (the field names of [UsageRecord]'s
// json tags, decoded by encoding/json on replay), and a newline. A delta
// is the final record of a request whose provisional line is in the
// journal (rec.pseg is set): its ID, time and numbers, and only the
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
	b = append(b, "00000000 "...)
	switch kind {
	case lineProvisional:
		b = append(b, 'P')
	case lineDelta:
		b = append(b, 'D')
	}
	b = append(b, `{"time":"`...)
	b = rec.Time.AppendFormat(b, time.RFC3339Nano)
	b = append(b, '"')
	b = appendStrField(b, "id", rec.ID)
	if kind == lineDelta {
		p := &rec.prov
		b = appendChangedField(b, "request_id", rec.RequestID, p.requestID)
		b = appendChangedField(b, "team_id", rec.TeamID, p.teamID)
		b = appendChangedField(b, "token_id", rec.TokenID, p.tokenID)
		b = appendChangedField(b, "service", rec.Service, p.service)
		b = appendChangedField(b, "router", rec.Router, p.router)
		b = appendChangedField(b, "key_id", rec.KeyID, p.keyID)
		b = appendChangedField(b, "model", rec.Model, p.model)
	} else {
		b = appendStrField(b, "request_id", rec.RequestID)
		b = appendStrField(b, "team_id", rec.TeamID)
		b = appendStrField(b, "token_id", rec.TokenID)
		b = appendStrField(b, "service", rec.Service)
		b = appendStrField(b, "router", rec.Router)
		b = appendStrField(b, "key_id", rec.KeyID)
		b = appendStrField(b, "model", rec.Model)
	}
	// A whole record omits zero numbers (replay decodes into a zero
	// record); a delta names every number, each replacing its provisional
	// line's.
	all := kind == lineDelta
	b = appendIntField(b, "status", int64(rec.Status), all)
	b = appendIntField(b, "tokens_in", rec.TokensIn, all)
	b = appendIntField(b, "tokens_out", rec.TokensOut, all)
	b = appendIntField(b, "cached_tokens", rec.CachedTokens, all)
	b = appendFloatField(b, "cost", rec.Cost, all)
	b = appendIntField(b, "latency_ms", rec.LatencyMS, all)
	b = appendFloatField(b, "key_spend", rec.KeySpend, all)
	b = append(b, '}')
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
// (a JSON string escapes its newlines, so a line ends at the first).
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

// appendChangedField appends field name with value v when v differs from
// was, the provisional line's value (an empty v too, so that replay
// clears the field).
func appendChangedField(b []byte, name, v, was string) []byte {
	if v == was {
		return b
	}
	b = append(b, ',', '"')
	b = append(b, name...)
	b = append(b, '"', ':')
	return appendJSONString(b, v)
}

func appendStrField(b []byte, name, v string) []byte {
	if v == "" {
		return b
	}
	b = append(b, ',', '"')
	b = append(b, name...)
	b = append(b, '"', ':')
	return appendJSONString(b, v)
}

// appendIntField appends field name with value v, unless v is zero and
// zero is not wanted.
func appendIntField(b []byte, name string, v int64, zero bool) []byte {
	if v == 0 && !zero {
		return b
	}
	b = append(b, ',', '"')
	b = append(b, name...)
	b = append(b, '"', ':')
	return strconv.AppendInt(b, v, 10)
}

// appendFloatField appends field name with value v (0 for NaN and
// infinities), unless that is zero and zero is not wanted.
func appendFloatField(b []byte, name string, v float64, zero bool) []byte {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		v = 0
	}
	if v == 0 && !zero {
		return b
	}
	b = append(b, ',', '"')
	b = append(b, name...)
	b = append(b, '"', ':')
	if v == math.Trunc(v) && math.Abs(v) < 1<<53 {
		return strconv.AppendInt(b, int64(v), 10) // exact, and cheaper than the shortest-float search
	}
	return strconv.AppendFloat(b, v, 'g', -1, 64)
}

// appendJSONString appends s as a JSON string; invalid UTF-8 becomes
// U+FFFD, as encoding/json does.
func appendJSONString(b []byte, s string) []byte {
	const hexDigits = "0123456789abcdef"
	b = append(b, '"')
	for i := 0; i < len(s); {
		// Copy the run of bytes that need no escaping at once: ids,
		// names and models are plain ASCII.
		k := i
		for k < len(s) && s[k] >= 0x20 && s[k] < utf8.RuneSelf && s[k] != '"' && s[k] != '\\' {
			k++
		}
		if k > i {
			b = append(b, s[i:k]...)
			if i = k; i == len(s) {
				break
			}
		}
		c := s[i]
		if c < utf8.RuneSelf {
			switch {
			case c == '"' || c == '\\':
				b = append(b, '\\', c)
			case c < 0x20:
				switch c {
				case '\n':
					b = append(b, '\\', 'n')
				case '\r':
					b = append(b, '\\', 'r')
				case '\t':
					b = append(b, '\\', 't')
				default:
					b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
				}
			default:
				b = append(b, c)
			}
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, `\ufffd`...)
		} else {
			b = append(b, s[i:i+size]...)
		}
		i += size
	}
	return append(b, '"')
}
