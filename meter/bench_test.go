package meter

import (
	"bytes"
	"io"
	"testing"
)

// eventBody replays a recorded body one piece per Read, the way an
// upstream's events arrive, without allocating.
type eventBody struct {
	data   []byte
	pieces []int // end offsets
	i, off int
}

func newEventBody(data []byte, perEvent bool) *eventBody {
	b := &eventBody{data: data}
	if perEvent {
		for off := 0; off < len(data); {
			k := bytes.Index(data[off:], []byte("\n\n"))
			if k < 0 {
				off = len(data)
			} else {
				off += k + 2
			}
			b.pieces = append(b.pieces, off)
		}
	} else {
		b.pieces = []int{len(data)}
	}
	return b
}

func (b *eventBody) reset() { b.i, b.off = 0, 0 }

func (b *eventBody) Read(p []byte) (int, error) {
	if b.i >= len(b.pieces) {
		return 0, io.EOF
	}
	end := b.pieces[b.i]
	n := copy(p, b.data[b.off:end])
	b.off += n
	if b.off == end {
		b.i++
	}
	return n, nil
}

func (b *eventBody) Close() error { return nil }

func copyLoop(r io.Reader, buf []byte) {
	for {
		_, err := r.Read(buf)
		if err != nil {
			return
		}
	}
}

func benchBody(b *testing.B, file string, perEvent bool, opts Options) {
	data := readFixture(b, file)
	if file == "openai_chat.json" { // pad to a typical 1 KiB response
		data = bytes.Replace(data, []byte(`"service_tier"`), append(bytes.Repeat([]byte(" "), 1024-len(data)), `"service_tier"`...), 1)
	}
	body := newEventBody(data, perEvent)
	buf := make([]byte, 32<<10)
	var sink Usage
	opts.OnDone = func(u Usage) { sink = u }
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		body.reset()
		if opts.Family == FamilyNone {
			copyLoop(body, buf) // baseline: the proxy's copy without metering
			continue
		}
		r := NewReader(body, opts)
		copyLoop(r, buf)
		r.Close()
	}
	if opts.Family != FamilyNone && !sink.Found {
		b.Fatal("no usage")
	}
}

func BenchmarkJSON1KiB(b *testing.B) {
	b.Run("baseline", func(b *testing.B) { benchBody(b, "openai_chat.json", false, Options{}) })
	b.Run("metered", func(b *testing.B) {
		benchBody(b, "openai_chat.json", false, Options{Family: FamilyOpenAI, Model: "gpt-4o"})
	})
}

func BenchmarkSSE50Chunks(b *testing.B) {
	const sse = "text/event-stream"
	b.Run("baseline", func(b *testing.B) { benchBody(b, "openai_chat_stream.sse", true, Options{}) })
	b.Run("openai", func(b *testing.B) {
		benchBody(b, "openai_chat_stream.sse", true, Options{Family: FamilyOpenAI, ContentType: sse})
	})
	b.Run("openai-strip", func(b *testing.B) {
		benchBody(b, "openai_chat_stream.sse", true, Options{Family: FamilyOpenAI, ContentType: sse, StripUsageChunk: true})
	})
	b.Run("anthropic", func(b *testing.B) {
		benchBody(b, "anthropic_stream.sse", true, Options{Family: FamilyAnthropic, ContentType: sse})
	})
	b.Run("gemini", func(b *testing.B) {
		benchBody(b, "gemini_stream.sse", true, Options{Family: FamilyGemini, ContentType: sse})
	})
}

func BenchmarkJSON1KiBParallel(b *testing.B) {
	data := readFixture(b, "openai_chat.json")
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		body := newEventBody(data, false)
		buf := make([]byte, 32<<10)
		for pb.Next() {
			body.reset()
			r := NewReader(body, Options{Family: FamilyOpenAI})
			copyLoop(r, buf)
			r.Close()
		}
	})
}

func BenchmarkInspectRequest(b *testing.B) {
	msg := `{"role":"user","content":"` + string(bytes.Repeat([]byte("lorem ipsum "), 80)) + `"},`
	body := []byte(`{"model":"gpt-4o-mini","messages":[` + string(bytes.Repeat([]byte(msg), 10)) +
		`{"role":"user","content":"hi"}],"temperature":0.2,"stream":true}`)
	b.Run("inspect", func(b *testing.B) {
		b.SetBytes(int64(len(body)))
		b.ReportAllocs()
		for b.Loop() {
			InspectRequest(body)
		}
	})
	b.Run("ensure-stream-usage", func(b *testing.B) {
		b.SetBytes(int64(len(body)))
		b.ReportAllocs()
		for b.Loop() {
			EnsureStreamUsage(body)
		}
	})
	b.Run("with-stream-usage", func(b *testing.B) {
		// The proxy's path: the body was inspected already; the edit
		// reads no byte of it again.
		info := InspectRequest(body)
		b.SetBytes(int64(len(body)))
		b.ReportAllocs()
		for b.Loop() {
			info.WithStreamUsage(body)
		}
	})
}

func BenchmarkLookup(b *testing.B) {
	p := DefaultPrices()
	b.ReportAllocs()
	for b.Loop() {
		p.Lookup("claude-sonnet-4-20250514")
	}
}
