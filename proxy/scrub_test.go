package proxy

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"regexp"
	"sort"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/keypool/keypool"
)

// Secrets with every character class an encoding treats specially.
const (
	specialSecret = `sk-rt-A&b<c>d"e\f/g+h=i~j%k l;m` + "0123456789"
	basicSecret   = "acct_0123456789:sk-rt-basic-secret-0123456789"
	querySecret   = "sk-rt-query/0123+456789==abcdef"
)

// spellingsFor returns, by name, how an upstream might echo s: raw,
// URL-escaped (query and path forms, upper and lower hex, JavaScript's
// encodeURIComponent), JSON-escaped (Go's HTML-safe form with lower and
// upper hex, the plain form, PHP's escaped slashes) and base64 (standard
// and URL alphabets, padded and not) of s at each alignment and of the
// basic-auth spellings user:s and s:. It is written independently of the
// scrubber's own list.
func spellingsFor(s string) map[string]string {
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

// leakOf names the spelling of secret that text still holds, or "". For
// base64 it decodes every run of base64 characters at each offset and
// looks for the secret's middle (all but two bytes at each end, which a
// redacted base64 run may leave half-encoded at its edges).
func leakOf(text, secret string) string {
	names := make([]string, 0, 32)
	sp := spellingsFor(secret)
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

// echoAll writes every spelling of each secret, each between markers, so
// that base64 runs are delimited and prefixes vary.
func echoAll(secrets ...string) string {
	var b strings.Builder
	for _, s := range secrets {
		sp := spellingsFor(s)
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

func TestScrubSpellings(t *testing.T) {
	for _, secret := range []string{specialSecret, basicSecret, querySecret, goodSecret, teamToken} {
		in := "start " + echoAll(secret) + " end"
		for _, mode := range []string{"known length", "streamed", "one byte"} {
			t.Run(fmt.Sprintf("%.12s/%s", secret, mode), func(t *testing.T) {
				if leakOf(in, secret) == "" {
					t.Fatal("the input holds no secret: the test cannot fail")
				}
				var r io.Reader = strings.NewReader(in)
				cl := int64(len(in))
				switch mode {
				case "streamed":
					cl = -1
				case "one byte":
					cl, r = -1, iotest.OneByteReader(r)
				}
				resp := &http.Response{StatusCode: 200, Header: http.Header{}, ContentLength: cl, Body: io.NopCloser(r)}
				scrubBody(resp, secret)
				got, err := io.ReadAll(iotest.OneByteReader(resp.Body))
				if err != nil {
					t.Fatal(err)
				}
				if l := leakOf(string(got), secret); l != "" {
					t.Errorf("%s leaked:\n%s", l, got)
				}
				if !strings.HasPrefix(string(got), "start ") || !strings.HasSuffix(string(got), " end") || !strings.Contains(string(got), Redacted) {
					t.Errorf("body mangled: %.300s", got)
				}
				if cl >= 0 && resp.ContentLength != int64(len(got)) {
					t.Errorf("ContentLength %d, body %d", resp.ContentLength, len(got))
				}
			})
		}
	}
}

func TestScrubHeaderSpellings(t *testing.T) {
	for _, secret := range []string{specialSecret, basicSecret, querySecret} {
		h := http.Header{}
		for n, v := range spellingsFor(secret) {
			h.Set("X-Echo-"+strings.NewReplacer(" ", "-", ":", "c", "+", "p").Replace(n), "a "+v+" b")
		}
		scrubHeader(h, secret)
		if l := leakOf(fmt.Sprint(h), secret); l != "" {
			t.Errorf("%.12s: %s leaked: %v", secret, l, h)
		}
	}
}

// TestScrubKeepsSSEFlowing checks that the scrubber holds back only what
// could begin a secret: each event reaches the reader as soon as it was
// read, though the next one has not arrived.
func TestScrubKeepsSSEFlowing(t *testing.T) {
	pr, pw := io.Pipe()
	resp := &http.Response{StatusCode: 200, Header: http.Header{"Content-Type": {"text/event-stream"}}, ContentLength: -1, Body: pr}
	scrubBody(resp, goodSecret)
	events := []string{"data: {\"n\":1}\n\n", "data: {\"k\":\"" + goodSecret[:10], goodSecret[10:] + "\"}\n\n", "data: [DONE]\n\n"}
	wants := []string{events[0], "data: {\"k\":\"", Redacted + "\"}\n\n", events[3]}
	go func() {
		for _, e := range events {
			_, _ = pw.Write([]byte(e))
		}
		pw.Close()
	}()
	buf := make([]byte, 4096)
	for i, want := range wants {
		var got string
		for len(got) < len(want) {
			n, err := resp.Body.Read(buf)
			got += string(buf[:n])
			if err != nil {
				t.Fatalf("read %d: %v (got %q)", i, err, got)
			}
		}
		if got != want {
			t.Fatalf("read %d = %q, want %q", i, got, want)
		}
	}
}

// TestHandlerScrubsEveryEncoding is the attack of issue 16 item 3: an
// upstream echoes the key (and the team token) in every spelling, in
// headers and bodies of every status, streamed and not; nothing of either
// may reach the client, the logs or the request's result.
func TestHandlerScrubsEveryEncoding(t *testing.T) {
	schemes := []struct {
		name   string
		auth   keypool.AuthScheme
		secret string
	}{
		{"bearer", keypool.Bearer, specialSecret},
		{"basic", keypool.Basic, basicSecret},
		{"query", keypool.QueryParam, querySecret},
	}
	for _, sc := range schemes {
		for _, status := range []int{200, 401, 500} {
			for _, mode := range []string{"fixed", "stream"} {
				t.Run(fmt.Sprintf("%s/%d/%s", sc.name, status, mode), func(t *testing.T) {
					up := newUpstream(t, func(w http.ResponseWriter, r *http.Request, _ string, _ int) {
						// What the upstream received, as it received it.
						w.Header().Set("Www-Authenticate", "echo "+r.Header.Get("Authorization"))
						w.Header().Set("X-Echo-Uri", r.RequestURI)
						for n, v := range spellingsFor(sc.secret) {
							w.Header().Add("X-Echo", n+"="+v)
						}
						for n, v := range spellingsFor(teamToken) {
							w.Header().Add("X-Echo-Token", n+"="+v)
						}
						body := "auth=" + r.Header.Get("Authorization") + " uri=" + r.RequestURI + "\n" + echoAll(sc.secret, teamToken)
						if mode == "fixed" {
							w.Header().Set("Content-Type", "application/json")
							w.WriteHeader(status)
							io.WriteString(w, body)
							return
						}
						w.Header().Set("Content-Type", "text/event-stream")
						w.WriteHeader(status)
						for i := 0; i < len(body); i += 7 {
							io.WriteString(w, body[i:min(i+7, len(body))])
							w.(http.Flusher).Flush()
						}
					})
					e := newProxy(t, up.URL, sc.auth, []string{"good"}, nil)
					if err := e.pool.SetService(keypool.Service{Name: "svc", BaseURL: up.URL, Auth: sc.auth},
						[]keypool.Key{{ID: "k1", Secret: keypool.Secret(sc.secret)}}); err != nil {
						t.Fatal(err)
					}
					resp, b := e.do(t, "GET", "/v1/svc/echo", nil)
					if resp.StatusCode != status {
						t.Fatalf("status %d: %.300s", resp.StatusCode, b)
					}
					if hits := up.Hits(); len(hits) == 0 || !strings.Contains(fmt.Sprint(hits[0].header)+hits[0].uri, spellingsFor(sc.secret)[map[string]string{"bearer": "raw", "basic": "base64 std ", "query": "query"}[sc.name]]) {
						t.Fatalf("the upstream did not get the key as expected: %+v", hits)
					}
					res := waitFor(t, e.done, "OnDone")
					all := string(b) + "\n" + fmt.Sprint(resp.Header) + "\n" + e.logs.String() + fmt.Sprintf("\n%v %+v", res.Err, res)
					for _, s := range []string{sc.secret, teamToken} {
						if l := leakOf(all, s); l != "" {
							i := strings.Index(all, spellingsFor(s)[l])
							t.Errorf("%.10s… leaked as %s: …%s…", s, l, all[max(0, i-80):min(len(all), max(i, 0)+120)])
						}
					}
					if !strings.Contains(string(b), Redacted) || !strings.Contains(resp.Header.Get("Www-Authenticate"), Redacted) && sc.name != "query" {
						t.Errorf("nothing redacted: %q / %.200s", resp.Header.Get("Www-Authenticate"), b)
					}
				})
			}
		}
	}
}

// TestHandlerClientDisconnectMidStream: a client that hangs up after the
// first event of a stream is recorded as 499, not 200.
func TestHandlerClientDisconnectMidStream(t *testing.T) {
	gone := make(chan struct{})
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request, key string, n int) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: {\"n\":1}\n\n")
		w.(http.Flusher).Flush()
		select {
		case <-r.Context().Done():
		case <-gone:
		}
	})
	defer close(gone)
	e := newProxy(t, up.URL, keypool.Bearer, []string{"good"}, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "POST", e.srv.URL+"/v1/svc/stream", strings.NewReader("{}"))
	req.Header.Set("Authorization", "Bearer "+teamToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	if n, err := resp.Body.Read(buf); n == 0 || err != nil {
		t.Fatalf("first event: %q %v", buf[:n], err)
	}
	cancel()
	resp.Body.Close()
	res := waitFor(t, e.done, "OnDone")
	if res.Status != 499 {
		t.Errorf("status %d, want 499 (%+v)", res.Status, res)
	}
	if st := keyStats(t, e.pool, "good"); st.State != keypool.StateActive || st.Failures != 0 {
		t.Errorf("key after the client left: %+v", st)
	}
}
