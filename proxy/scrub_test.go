package proxy

import (
	"bytes"
	"compress/flate"
	"compress/gzip"
	"compress/zlib"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/internal/testutil"
)

// Secrets with every character class an encoding treats specially.
const (
	specialSecret = `sk-rt-A&b<c>d"e\f/g+h=i~j%k l;m` + "0123456789"
	basicSecret   = "acct_0123456789:sk-rt-basic-secret-0123456789"
	querySecret   = "sk-rt-query/0123+456789==abcdef"
)

func TestScrubSpellings(t *testing.T) {
	for _, secret := range []string{specialSecret, basicSecret, querySecret, goodSecret, teamToken} {
		in := "start " + testutil.EchoAll(secret) + " end"
		for _, mode := range []string{"known length", "streamed", "one byte"} {
			t.Run(fmt.Sprintf("%.12s/%s", secret, mode), func(t *testing.T) {
				if testutil.Leak(in, secret) == "" {
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
				if l := testutil.Leak(string(got), secret); l != "" {
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
		for n, v := range testutil.Spellings(secret) {
			h.Set("X-Echo-"+strings.NewReplacer(" ", "-", ":", "c", "+", "p").Replace(n), "a "+v+" b")
		}
		scrubHeader(h, secret)
		if l := testutil.Leak(fmt.Sprint(h), secret); l != "" {
			t.Errorf("%.12s: %s leaked: %v", secret, l, h)
		}
	}
}

// TestScrubGzipAnswer: an upstream that gzips its answer although
// keypoold asked for identity is scrubbed (and sent) decoded.
func TestScrubGzipAnswer(t *testing.T) {
	var zb bytes.Buffer
	zw := gzip.NewWriter(&zb)
	io.WriteString(zw, "echo "+goodSecret+" end")
	zw.Close()
	resp := &http.Response{StatusCode: 200, Header: http.Header{"Content-Encoding": {"gzip"}}, ContentLength: int64(zb.Len()), Body: io.NopCloser(&zb)}
	scrubBody(resp, goodSecret)
	got, err := io.ReadAll(resp.Body)
	if err != nil || string(got) != "echo "+Redacted+" end" || resp.Header.Get("Content-Encoding") != "" {
		t.Errorf("got %q %v, headers %v", got, err, resp.Header)
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
						for n, v := range testutil.Spellings(sc.secret) {
							w.Header().Add("X-Echo", n+"="+v)
						}
						for n, v := range testutil.Spellings(teamToken) {
							w.Header().Add("X-Echo-Token", n+"="+v)
						}
						body := "auth=" + r.Header.Get("Authorization") + " uri=" + r.RequestURI + "\n" + testutil.EchoAll(sc.secret, teamToken)
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
					if hits := up.Hits(); len(hits) == 0 || !strings.Contains(fmt.Sprint(hits[0].header)+hits[0].uri, testutil.Spellings(sc.secret)[map[string]string{"bearer": "raw", "basic": "base64 std ", "query": "query"}[sc.name]]) {
						t.Fatalf("the upstream did not get the key as expected: %+v", hits)
					}
					res := waitFor(t, e.done, "OnDone")
					all := string(b) + "\n" + fmt.Sprint(resp.Header) + "\n" + e.logs.String() + fmt.Sprintf("\n%v %+v", res.Err, res)
					for _, s := range []string{sc.secret, teamToken} {
						if l := testutil.Leak(all, s); l != "" {
							i := strings.Index(all, testutil.Spellings(s)[l])
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

// BenchmarkScrubBody measures scrubbing answers for a key and a team token
// against reading them as they are: a 1 KiB JSON answer (in memory), a
// 64 KiB body of unknown length and an SSE stream of 200 small events
// (streamed).
func BenchmarkScrubBody(b *testing.B) {
	json := []byte(`{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"` +
		strings.Repeat("lorem ipsum dolor sit amet ", 34) + `"}}],"usage":{"prompt_tokens":11,"completion_tokens":7}}`)
	big := bytes.Repeat([]byte("data: {\"choices\":[{\"delta\":{\"content\":\"some streamed text\"}}]}\n\n"), 64<<10/64)
	var sse [][]byte
	for i := 0; i < 200; i++ {
		sse = append(sse, []byte(fmt.Sprintf("data: {\"choices\":[{\"delta\":{\"content\":\"tok%d\"}}]}\n\n", i)))
	}
	req := httptest.NewRequest("POST", "/v1/svc/x", nil)
	m := newMatcher(setFor(goodSecret), setFor(teamToken)) // a key and the team token, as the Handler scrubs
	cases := []struct {
		name   string
		chunks [][]byte
		known  bool
	}{{"json-1KiB", [][]byte{json}, true}, {"stream-64KiB", [][]byte{big}, false}, {"sse-200-events", sse, false}}
	buf := make([]byte, 32<<10)
	for _, c := range cases {
		n := 0
		for _, ch := range c.chunks {
			n += len(ch)
		}
		for _, scrub := range []bool{false, true} {
			name := c.name + "/plain"
			if scrub {
				name = c.name + "/scrubbed"
			}
			b.Run(name, func(b *testing.B) {
				b.ReportAllocs()
				b.SetBytes(int64(n))
				for b.Loop() {
					cl := int64(-1)
					if c.known {
						cl = int64(n)
					}
					resp := &http.Response{StatusCode: 200, Header: http.Header{}, ContentLength: cl, Body: &chunkReader{chunks: c.chunks}, Request: req}
					if scrub {
						scrubBodyWith(resp, m, 0, nil, nil)
					}
					for {
						if _, err := resp.Body.Read(buf); err != nil {
							break
						}
					}
					resp.Body.Close()
				}
			})
		}
	}
}

// chunkReader returns one chunk per Read, as a streaming upstream does.
type chunkReader struct {
	chunks [][]byte
	i      int
}

func (c *chunkReader) Read(p []byte) (int, error) {
	if c.i >= len(c.chunks) {
		return 0, io.EOF
	}
	n := copy(p, c.chunks[c.i])
	c.i++
	return n, nil
}

func (c *chunkReader) Close() error { return nil }

// TestScrubTrailers: trailers, known only once the body has ended, are
// scrubbed then, in memory and streamed.
func TestScrubTrailers(t *testing.T) {
	for _, cl := range []int64{4, -1} {
		tr := http.Header{"X-Echo": nil}
		body := &trailerBody{r: strings.NewReader("body"), tr: tr, v: "key=" + goodSecret}
		resp := &http.Response{StatusCode: 200, Header: http.Header{}, ContentLength: cl, Body: body, Trailer: tr}
		scrubBody(resp, goodSecret)
		if _, err := io.ReadAll(resp.Body); err != nil {
			t.Fatal(err)
		}
		if got := resp.Trailer.Get("X-Echo"); got != "key="+Redacted {
			t.Errorf("length %d: trailer %q", cl, got)
		}
	}
}

// trailerBody fills in its trailer at EOF, as net/http does.
type trailerBody struct {
	r  io.Reader
	tr http.Header
	v  string
}

func (b *trailerBody) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	if err == io.EOF {
		b.tr.Set("X-Echo", b.v)
	}
	return n, err
}

func (b *trailerBody) Close() error { return nil }

// TestScrubOtherEncodings: an answer encoded otherwise than as one gzip
// layer (deflate, stacked layers, the encoding split over header lines, one
// keypoold cannot decode) never carries the key to the client.
func TestScrubOtherEncodings(t *testing.T) {
	plain := "echo " + goodSecret + " end"
	gz := func(b []byte) []byte {
		var zb bytes.Buffer
		zw := gzip.NewWriter(&zb)
		zw.Write(b)
		zw.Close()
		return zb.Bytes()
	}
	zl := func(b []byte) []byte {
		var zb bytes.Buffer
		zw := zlib.NewWriter(&zb)
		zw.Write(b)
		zw.Close()
		return zb.Bytes()
	}
	raw := func(b []byte) []byte {
		var zb bytes.Buffer
		zw, _ := flate.NewWriter(&zb, flate.DefaultCompression)
		zw.Write(b)
		zw.Close()
		return zb.Bytes()
	}
	tests := []struct {
		name   string
		enc    []string
		body   []byte
		decode bool // the answer can be decoded and is sent decoded
	}{
		{"deflate (zlib)", []string{"deflate"}, zl([]byte(plain)), true},
		{"deflate (raw)", []string{"deflate"}, raw([]byte(plain)), true},
		{"gzip twice", []string{"gzip, gzip"}, gz(gz([]byte(plain))), true},
		{"gzip over deflate", []string{"deflate, gzip"}, gz(zl([]byte(plain))), true},
		{"two header lines", []string{"identity", "gzip"}, gz([]byte(plain)), true},
		{"unknown encoding", []string{"x-rot"}, []byte(plain), false},
	}
	for _, tt := range tests {
		for _, cl := range []int64{int64(len(tt.body)), -1} {
			t.Run(fmt.Sprintf("%s/%d", tt.name, cl), func(t *testing.T) {
				resp := &http.Response{StatusCode: 200, Header: http.Header{"Content-Encoding": tt.enc}, ContentLength: cl, Body: io.NopCloser(bytes.NewReader(tt.body))}
				scrubBody(resp, goodSecret)
				got, err := io.ReadAll(resp.Body)
				if enc := resp.Header.Values("Content-Encoding"); len(enc) != 0 {
					t.Errorf("Content-Encoding %q kept", enc)
				}
				if bytes.Contains(got, []byte(goodSecret)) {
					t.Fatalf("key leaked: %q", got)
				}
				if tt.decode && (err != nil || string(got) != "echo "+Redacted+" end") {
					t.Fatalf("got %q, %v", got, err)
				}
				if !tt.decode && err == nil {
					t.Fatalf("an answer keypoold cannot scrub ended cleanly: %q", got)
				}
			})
		}
	}
}
