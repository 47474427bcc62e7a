package meter

import "bytes"

// This file holds a small, lenient JSON scanner that works on byte slices
// without allocating. It does not validate JSON fully: it finds where values
// start and end, which is all metering and request rewriting need. Malformed
// input makes it report failure (-1 or false), never panic.

func isSpace(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }

func skipSpace(b []byte, i int) int {
	for i < len(b) && isSpace(b[i]) {
		i++
	}
	return i
}

// escaped reports whether the byte at b[i] is preceded by an odd number of
// backslashes within b.
func escaped(b []byte, i int) bool {
	n := 0
	for j := i - 1; j >= 0 && b[j] == '\\'; j-- {
		n++
	}
	return n%2 == 1
}

// skipString returns the index just past the string whose opening quote is
// at b[i], or -1 when the string does not end within b.
func skipString(b []byte, i int) int {
	j := i + 1
	for {
		k := bytes.IndexByte(b[j:], '"')
		if k < 0 {
			return -1
		}
		j += k
		if !escaped(b, j) {
			return j + 1
		}
		j++
	}
}

// skipValue returns the index just past the JSON value that starts at or
// after b[i] (leading white space is skipped), or -1 when there is no
// complete value there.
func skipValue(b []byte, i int) int {
	i = skipSpace(b, i)
	if i >= len(b) {
		return -1
	}
	switch b[i] {
	case '"':
		return skipString(b, i)
	case '{', '[':
		depth := 0
		for i < len(b) {
			switch b[i] {
			case '"':
				i = skipString(b, i)
				if i < 0 {
					return -1
				}
				continue
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					return i + 1
				}
			}
			i++
		}
		return -1
	case '}', ']', ',', ':':
		return -1
	default: // number, true, false, null
		j := i
		for j < len(b) && !isDelim(b[j]) {
			j++
		}
		return j
	}
}

func isDelim(c byte) bool {
	return c == ',' || c == '}' || c == ']' || c == ':' || c == '"' || c == '{' || c == '[' || isSpace(c)
}

// eachMember calls fn with the raw key (quotes removed, escapes kept) and
// the raw value of each member of the JSON object b (leading and trailing
// white space allowed). It stops early when fn returns false. It reports
// whether b is a well-formed object as far as it was read.
func eachMember(b []byte, fn func(key, val []byte, keyStart, valStart, valEnd int) bool) bool {
	i := skipSpace(b, 0)
	if i >= len(b) || b[i] != '{' {
		return false
	}
	i = skipSpace(b, i+1)
	if i < len(b) && b[i] == '}' {
		return true
	}
	for {
		if i >= len(b) || b[i] != '"' {
			return false
		}
		ks := i
		ke := skipString(b, i)
		if ke < 0 {
			return false
		}
		i = skipSpace(b, ke)
		if i >= len(b) || b[i] != ':' {
			return false
		}
		vs := skipSpace(b, i+1)
		ve := skipValue(b, vs)
		if ve < 0 {
			return false
		}
		if !fn(b[ks+1:ke-1], b[vs:ve], ks, vs, ve) {
			return true
		}
		i = skipSpace(b, ve)
		if i >= len(b) {
			return false
		}
		switch b[i] {
		case ',':
			i = skipSpace(b, i+1)
		case '}':
			return true
		default:
			return false
		}
	}
}

// findKey returns the value of the first member named key (given with its
// quotes, e.g. `"usage"`) at any depth of b, or nil. A match inside a
// string value is skipped: the quotes of a key are never escaped, and a
// string followed by a colon is always a key.
func findKey(b []byte, quotedKey string) []byte {
	off := 0
	for {
		k := bytes.Index(b[off:], []byte(quotedKey))
		if k < 0 {
			return nil
		}
		k += off
		off = k + 1
		if escaped(b, k) {
			continue
		}
		i := skipSpace(b, k+len(quotedKey))
		if i >= len(b) || b[i] != ':' {
			continue
		}
		vs := skipSpace(b, i+1)
		ve := skipValue(b, vs)
		if ve < 0 {
			return nil
		}
		return b[vs:ve]
	}
}

// parseInt parses a non-negative JSON number as an integer, truncating any
// fraction. It reports false for anything else.
func parseInt(b []byte) (int64, bool) {
	if len(b) == 0 || b[0] < '0' || b[0] > '9' {
		return 0, false
	}
	var n int64
	for _, c := range b {
		if c < '0' || c > '9' {
			break
		}
		if n > (1<<62)/10 {
			return 0, false
		}
		n = n*10 + int64(c-'0')
	}
	return n, true
}
