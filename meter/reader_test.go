package meter

import (
	"bytes"
	"fmt"
	"io"
	"math"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// chunkBody is an upstream body that hands out its data in chunks of the
// sizes next returns, as a network connection would.
type chunkBody struct {
	data   []byte
	next   func() int
	closed int
}

func (c *chunkBody) Read(p []byte) (int, error) {
	if len(c.data) == 0 {
		return 0, io.EOF
	}
	n := min(max(c.next(), 1), len(p), len(c.data))
	copy(p, c.data[:n])
	c.data = c.data[n:]
	return n, nil
}

func (c *chunkBody) Close() error { c.closed++; return nil }

type split struct {
	name string
	next func(r *rand.Rand) func() int
}

var splits = []split{
	{"whole", func(*rand.Rand) func() int { return func() int { return 1 << 30 } }},
	{"bytewise", func(*rand.Rand) func() int { return func() int { return 1 } }},
	{"random-small", func(r *rand.Rand) func() int { return func() int { return 1 + r.Intn(24) } }},
	{"random", func(r *rand.Rand) func() int { return func() int { return 1 + r.Intn(700) } }},
}

// drain reads r to EOF with a buffer of bufSize bytes, the way a proxy's
// copy loop does, and returns what it got.
func drain(t testing.TB, r io.Reader, bufSize int) []byte {
	t.Helper()
	var out bytes.Buffer
	buf := make([]byte, bufSize)
	for i := 0; ; i++ {
		n, err := r.Read(buf)
		out.Write(buf[:n])
		if err == io.EOF {
			return out.Bytes()
		}
		if err != nil {
			t.Fatalf("read: %v", err)
		}
		if i > 1<<22 {
			t.Fatal("reader makes no progress")
		}
	}
}

func readFixture(t testing.TB, name string) []byte {
	t.Helper()
	b, err := readFixtureErr(name)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func readFixtureErr(name string) ([]byte, error) {
	return os.ReadFile(filepath.Join("testdata", name))
}

type fixture struct {
	file     string
	family   Family
	reqModel string
	want     Usage
	usd      float64 // expected cost at DefaultPrices
}

// The expected costs are worked out by hand from prices.yaml; see the
// comment on each line.
var fixtures = []fixture{
	{"openai_chat.json", FamilyOpenAI, "gpt-4o",
		Usage{Model: "gpt-4o-2024-08-06", InputTokens: 125000, OutputTokens: 3200, CachedTokens: 100000},
		0.2195}, // 25000×2.50 + 100000×1.25 + 3200×10.00
	{"openai_chat_stream.sse", FamilyOpenAI, "gpt-4o-mini",
		Usage{Model: "gpt-4o-mini-2024-07-18", InputTokens: 40000, OutputTokens: 1500},
		0.0069}, // 40000×0.15 + 1500×0.60
	{"openai_responses.json", FamilyOpenAI, "gpt-4.1",
		Usage{Model: "gpt-4.1-2025-04-14", InputTokens: 300000, OutputTokens: 20000, CachedTokens: 200000},
		0.46}, // 100000×2.00 + 200000×0.50 + 20000×8.00
	{"openai_responses_stream.sse", FamilyOpenAI, "o4-mini",
		Usage{Model: "o4-mini-2025-04-16", InputTokens: 10000, OutputTokens: 50000, CachedTokens: 4096},
		0.2276208}, // 5904×1.10 + 4096×0.275 + 50000×4.40
	{"anthropic_message.json", FamilyAnthropic, "claude-sonnet-4-0",
		Usage{Model: "claude-sonnet-4-20250514", InputTokens: 125000, OutputTokens: 4000, CachedTokens: 100000, CacheWriteTokens: 20000},
		0.18}, // 5000×3.00 + 100000×0.30 + 20000×3.75 + 4000×15.00
	{"anthropic_stream.sse", FamilyAnthropic, "claude-haiku-4-5",
		Usage{Model: "claude-haiku-4-5-20251001", InputTokens: 75000, OutputTokens: 8000, CachedTokens: 50000},
		0.07}, // 25000×1.00 + 50000×0.10 + 8000×5.00
	{"gemini.json", FamilyGemini, "gemini-2.5-pro",
		Usage{Model: "gemini-2.5-pro", InputTokens: 150000, OutputTokens: 10000, CachedTokens: 100000},
		0.175}, // 50000×1.25 + 100000×0.125 + (6000+4000 thoughts)×10.00
	{"gemini_stream.sse", FamilyGemini, "gemini-2.0-flash",
		Usage{Model: "gemini-2.0-flash", InputTokens: 80000, OutputTokens: 20000},
		0.016}, // 80000×0.10 + 20000×0.40
	{"gemini_stream_array.json", FamilyGemini, "gemini-2.5-flash",
		Usage{Model: "gemini-2.5-flash", InputTokens: 200000, OutputTokens: 40000},
		0.16}, // 200000×0.30 + (30000+10000 thoughts)×2.50
	{"groq_stream.sse", FamilyOpenAI, "llama-3.3-70b-versatile",
		Usage{Model: "llama-3.3-70b-versatile", InputTokens: 100000, OutputTokens: 20000},
		0.0748}, // 100000×0.59 + 20000×0.79
}

func TestFixtures(t *testing.T) {
	prices := DefaultPrices()
	for _, f := range fixtures {
		data := readFixture(t, f.file)
		for _, sp := range splits {
			for _, bufSize := range []int{32 << 10, 5} {
				t.Run(fmt.Sprintf("%s/%s/buf%d", f.file, sp.name, bufSize), func(t *testing.T) {
					rng := rand.New(rand.NewSource(int64(len(data) + bufSize)))
					src := &chunkBody{data: data, next: sp.next(rng)}
					calls := 0
					var got Usage
					ct := "application/json"
					if strings.HasSuffix(f.file, ".sse") {
						ct = "text/event-stream"
					}
					r := NewReader(src, Options{Family: f.family, Model: f.reqModel, ContentType: ct,
						OnDone: func(u Usage) { calls++; got = u }})
					out := drain(t, r, bufSize)
					if err := r.Close(); err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(out, data) {
						t.Fatalf("body changed: got %d bytes, want %d", len(out), len(data))
					}
					if calls != 1 {
						t.Fatalf("OnDone called %d times, want 1", calls)
					}
					want := f.want
					want.Found, want.Complete = true, true
					if got != want {
						t.Fatalf("usage\n got %+v\nwant %+v", got, want)
					}
					if r.Usage() != want {
						t.Fatalf("Usage() = %+v", r.Usage())
					}
					usd, ok := prices.Cost(got)
					if !ok {
						t.Fatalf("no price for %q", got.Model)
					}
					if math.Abs(usd-f.usd) > 1e-9 || math.Round(usd*100) != math.Round(f.usd*100) {
						t.Fatalf("cost = %.9f USD, want %.9f", usd, f.usd)
					}
					if src.closed != 1 {
						t.Fatalf("upstream body closed %d times", src.closed)
					}
				})
			}
		}
	}
}

func TestStripUsageChunk(t *testing.T) {
	in := readFixture(t, "openai_chat_stream.sse")
	want := readFixture(t, "openai_chat_stream.stripped.sse")
	crlf := func(b []byte) []byte { return bytes.ReplaceAll(b, []byte("\n"), []byte("\r\n")) }
	noFinalBlank := func(b []byte) []byte { return bytes.TrimSuffix(b, []byte("\n")) }
	cases := []struct {
		name    string
		in, out []byte
	}{
		{"lf", in, want},
		{"crlf", crlf(in), crlf(want)},
		{"no final blank line", noFinalBlank(in), noFinalBlank(want)},
		{"comments and event lines", append([]byte(": keep-alive\n\nevent: chunk\n"), in...), append([]byte(": keep-alive\n\nevent: chunk\n"), want...)},
	}
	for _, tc := range cases {
		for _, sp := range splits {
			for _, bufSize := range []int{32 << 10, 3} {
				t.Run(fmt.Sprintf("%s/%s/buf%d", tc.name, sp.name, bufSize), func(t *testing.T) {
					rng := rand.New(rand.NewSource(int64(bufSize)))
					var got Usage
					r := NewReader(&chunkBody{data: tc.in, next: sp.next(rng)}, Options{
						Family: FamilyOpenAI, ContentType: "text/event-stream; charset=utf-8",
						StripUsageChunk: true, OnDone: func(u Usage) { got = u }})
					out := drain(t, r, bufSize)
					r.Close()
					if !bytes.Equal(out, tc.out) {
						t.Fatalf("stripped stream differs:\n got %q\nwant %q", tail(out), tail(tc.out))
					}
					if !got.Found || got.InputTokens != 40000 || got.OutputTokens != 1500 || got.Model != "gpt-4o-mini-2024-07-18" {
						t.Fatalf("usage = %+v", got)
					}
				})
			}
		}
	}
}

func tail(b []byte) []byte {
	if len(b) > 600 {
		return b[len(b)-600:]
	}
	return b
}

func TestStripKeepsOtherUsage(t *testing.T) {
	// A usage object on a chunk that has choices (Groq's x_groq) is not an
	// extra chunk: it stays. So does every byte of a non-SSE response.
	for _, tc := range []struct{ file, ct string }{
		{"groq_stream.sse", "text/event-stream"},
		{"openai_chat_stream.sse", "application/json"},
		{"openai_responses_stream.sse", "text/event-stream"},
	} {
		in := readFixture(t, tc.file)
		r := NewReader(&chunkBody{data: in, next: func() int { return 13 }}, Options{
			Family: FamilyOpenAI, ContentType: tc.ct, StripUsageChunk: true})
		if out := drain(t, r, 1024); !bytes.Equal(out, in) {
			t.Errorf("%s (%s): body changed", tc.file, tc.ct)
		}
		if !r.Usage().Found {
			t.Errorf("%s: usage not found", tc.file)
		}
	}
}

func TestCloseEarly(t *testing.T) {
	data := readFixture(t, "anthropic_stream.sse")
	calls := 0
	var got Usage
	r := NewReader(&chunkBody{data: data, next: func() int { return 100 }}, Options{
		Family: FamilyAnthropic, OnDone: func(u Usage) { calls++; got = u }})
	buf := make([]byte, 1000)
	if _, err := io.ReadFull(r, buf); err != nil {
		t.Fatal(err)
	}
	r.Close()
	r.Close()
	if calls != 1 {
		t.Fatalf("OnDone called %d times", calls)
	}
	// The client hung up after message_start: input is known, output is
	// message_start's placeholder.
	if !got.Found || got.Complete || got.InputTokens != 75000 || got.OutputTokens != 1 {
		t.Fatalf("usage = %+v", got)
	}
}

func TestBadBodies(t *testing.T) {
	bodies := map[string][]byte{
		"empty":         nil,
		"html":          []byte("<html><body>502 Bad Gateway</body></html>"),
		"text":          []byte("upstream connect error or disconnect/reset before headers"),
		"error json":    readFixture(t, "openai_error.json"),
		"usage null":    []byte(`{"usage":null,"model":null}`),
		"usage string":  []byte(`{"usage":"{\"prompt_tokens\":5}"}`),
		"usage bad":     []byte(`{"usage":{"prompt_tokens":"many","completion_tokens":-3}}`),
		"unterminated":  []byte(`{"usage":{"prompt_tokens":12`),
		"deep":          bytes.Repeat([]byte(`{"usage":[`), 5000),
		"escaped key":   []byte(`{"text":"a \"usage\":{\"prompt_tokens\":5}"}`),
		"backslash key": []byte(`["\\\\\\\"usage\":{\"prompt_tokens\":5}"]`),
		"huge usage":    []byte(`{"usage":{"x":"` + strings.Repeat("a", maxUsageValue) + `","prompt_tokens":3}}`),
		"sse garbage":   []byte("data: {\"usage\":\ndata: }}}}\n\ndata: [DONE]\n\n"),
	}
	for name, body := range bodies {
		for _, fam := range []Family{FamilyOpenAI, FamilyAnthropic, FamilyGemini} {
			for _, sp := range splits {
				t.Run(name+"/"+fam.String()+"/"+sp.name, func(t *testing.T) {
					r := NewReader(&chunkBody{data: body, next: sp.next(rand.New(rand.NewSource(1)))},
						Options{Family: fam, ContentType: "text/event-stream", StripUsageChunk: true})
					out := drain(t, r, 64)
					r.Close()
					if !bytes.Equal(out, body) {
						t.Fatal("body changed")
					}
					if u := r.Usage(); u.Found {
						t.Fatalf("found usage in a body without any: %+v", u)
					}
				})
			}
		}
	}
}

func TestTruncated(t *testing.T) {
	for _, f := range fixtures {
		data := readFixture(t, f.file)
		key := `"usage"`
		if f.family == FamilyGemini {
			key = `"usageMetadata"`
		}
		first := bytes.Index(data, []byte(key+":"))
		if first < 0 {
			first = bytes.Index(data, []byte(key+": "))
		}
		for cut := 0; cut < len(data); cut += 1 + cut/7 {
			r := NewReader(io.NopCloser(bytes.NewReader(data[:cut])), Options{Family: f.family})
			drain(t, r, 17)
			u := r.Usage()
			if cut <= first && u.Found {
				t.Fatalf("%s cut at %d: found usage before its key: %+v", f.file, cut, u)
			}
		}
	}
}

func TestCompressedBodyIsNotMetered(t *testing.T) {
	data := readFixture(t, "openai_chat_stream.sse")
	r := NewReader(io.NopCloser(bytes.NewReader(data)), Options{Family: FamilyOpenAI,
		ContentType: "text/event-stream", ContentEncoding: "gzip", StripUsageChunk: true})
	if out := drain(t, r, 512); !bytes.Equal(out, data) {
		t.Fatal("body changed")
	}
	if r.Usage().Found {
		t.Fatal("metered a compressed body")
	}
}

func TestModelFallback(t *testing.T) {
	r := NewReader(io.NopCloser(strings.NewReader(`{"usage":{"prompt_tokens":3,"completion_tokens":4}}`)),
		Options{Family: FamilyOpenAI, Model: "gpt-4o"})
	drain(t, r, 8)
	if u := r.Usage(); u.Model != "gpt-4o" || u.InputTokens != 3 || u.OutputTokens != 4 {
		t.Fatalf("usage = %+v", u)
	}
}

func TestFamilyNonePassesThrough(t *testing.T) {
	data := readFixture(t, "openai_chat.json")
	called := false
	r := NewReader(io.NopCloser(bytes.NewReader(data)), Options{OnDone: func(u Usage) { called = !u.Found }})
	if out := drain(t, r, 100); !bytes.Equal(out, data) {
		t.Fatal("body changed")
	}
	if !called {
		t.Fatal("OnDone not called with Found == false")
	}
}

// TestConcurrentClose closes a Reader while another goroutine is blocked
// in Read, as a server does when a client hangs up (run with -race).
func TestConcurrentClose(t *testing.T) {
	for _, strip := range []bool{false, true} {
		pr, pw := io.Pipe()
		done := make(chan Usage, 2)
		r := NewReader(pr, Options{Family: FamilyOpenAI, ContentType: "text/event-stream",
			StripUsageChunk: strip, OnDone: func(u Usage) { done <- u }})
		readErr := make(chan error, 1)
		go func() {
			_, err := io.Copy(io.Discard, r)
			readErr <- err
		}()
		pw.Write([]byte("data: {\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":7}}\n\n"))
		// A pipe write returns once a Read took the bytes, so when this
		// second one returns, the first Read has been observed.
		pw.Write([]byte("data: {\"cho"))
		r.Close()
		if err := <-readErr; err == nil {
			t.Fatal("Read after Close returned no error")
		}
		u := <-done
		if u.Complete || u.InputTokens != 7 || u.Model != "gpt-4o" {
			t.Fatalf("strip=%v: usage = %+v", strip, u)
		}
		select {
		case <-done:
			t.Fatal("OnDone called twice")
		default:
		}
	}
}
