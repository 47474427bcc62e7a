package testutil

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/url"
	"regexp"
	"sort"
	"strings"
)

// Spellings returns, by name, how an upstream might echo s: raw,
// URL-escaped (query and path forms, upper and lower hex, JavaScript's
// encodeURIComponent), JSON-escaped (Go's HTML-safe form with lower and
// upper hex, the plain form, PHP's escaped slashes) and base64 (standard
// and URL alphabets, padded and not) of s at each alignment and of the
// basic-auth spellings user:s and s:. It is written independently of the
// scrubber's own list.
func Spellings(s string) map[string]string {
	m := map[string]string{
		"raw":         s,
		"query":       url.QueryEscape(s),
		"path":        url.PathEscape(s),
		"query lower": lowerHex(url.QueryEscape(s)),
		"path lower":  lowerHex(url.PathEscape(s)),
		"component":   encodeURIComponent(s),
	}
	j, _ := json.Marshal(s)
	m["json html"] = string(j[1 : len(j)-1])
	m["json html upper"] = regexp.MustCompile(`\\u[0-9a-f]{4}`).ReplaceAllStringFunc(m["json html"], func(e string) string { return `\u` + strings.ToUpper(e[2:]) })
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(s)
	plain := strings.TrimSpace(buf.String())
	m["json"] = plain[1 : len(plain)-1]
	m["json slash"] = strings.ReplaceAll(m["json"], "/", `\/`)
	for _, v := range []struct{ name, val string }{
		{"", s}, {"x+", "x" + s}, {"xy+", "xy" + s}, {"user:", "user:" + s}, {":", s + ":"}, {"+tail", s + "tail"},
	} {
		for _, e := range []struct {
			name string
			enc  *base64.Encoding
		}{{"std", base64.StdEncoding}, {"rawstd", base64.RawStdEncoding}, {"url", base64.URLEncoding}, {"rawurl", base64.RawURLEncoding}} {
			m["base64 "+e.name+" "+v.name] = e.enc.EncodeToString([]byte(v.val))
		}
	}
	return m
}

func lowerHex(s string) string {
	return regexp.MustCompile(`%[0-9A-F]{2}`).ReplaceAllStringFunc(s, strings.ToLower)
}

func encodeURIComponent(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("-_.!~*'()", c) >= 0 {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

var b64Run = regexp.MustCompile(`[A-Za-z0-9+/_-]{4,}`)

// Leak names the spelling of secret that text still holds, or "". For
// base64 it decodes every run of base64 characters at each offset and
// looks for the secret's middle (all but two bytes at each end, which a
// redacted base64 run may leave half-encoded at its edges).
func Leak(text, secret string) string {
	names := make([]string, 0, 32)
	sp := Spellings(secret)
	for n := range sp {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if strings.Contains(text, sp[n]) {
			return n
		}
	}
	core := []byte(secret[2 : len(secret)-2])
	for _, run := range b64Run.FindAllString(text, -1) {
		std := strings.NewReplacer("-", "+", "_", "/").Replace(run)
		for off := 0; off < 4 && off < len(std); off++ {
			r := std[off:]
			r = r[:len(r)/4*4]
			dec, err := base64.StdEncoding.DecodeString(r)
			if err == nil && bytes.Contains(dec, core) {
				return "base64 at offset " + fmt.Sprint(off) + " in " + run
			}
		}
	}
	return ""
}

// EchoAll writes every spelling of each secret, each between markers, so
// that base64 runs are delimited and prefixes vary.
func EchoAll(secrets ...string) string {
	var b strings.Builder
	for _, s := range secrets {
		sp := Spellings(s)
		names := make([]string, 0, len(sp))
		for n := range sp {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, n := range names {
			fmt.Fprintf(&b, "%s: [%s] %s|\n", n, sp[n], sp[n])
		}
	}
	return b.String()
}
