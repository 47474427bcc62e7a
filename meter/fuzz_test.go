package meter

import (
	"bytes"
	"encoding/json"
	"io"
	"math/rand"
	"testing"
)

func addFixtureSeeds(f *testing.F) {
	for _, fx := range fixtures {
		b, err := readFixtureErr(fx.file)
		if err == nil { // the first and last events or objects: small inputs fuzz faster
			f.Add(b[:min(len(b), 400)], int64(len(b)))
			f.Add(b[max(0, len(b)-400):], int64(len(b)/3))
		}
	}
	f.Add([]byte("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\n"), int64(1))
	f.Add([]byte(`\\"usage":{"prompt_tokens":2}`), int64(2))
	f.Add([]byte(`"usageMetadata":{"promptTokenCount":3},"modelVersion":"g"`), int64(3))
}

// FuzzReader checks that no input panics the Reader, that how the input
// is split across reads changes neither the usage found nor the bytes
// handed out, and that stripping only ever removes bytes.
func FuzzReader(f *testing.F) {
	addFixtureSeeds(f)
	f.Fuzz(func(t *testing.T, data []byte, seed int64) {
		for _, fam := range []Family{FamilyOpenAI, FamilyAnthropic, FamilyGemini} {
			for _, strip := range []bool{false, true} {
				opts := Options{Family: fam, ContentType: "text/event-stream", StripUsageChunk: strip}
				whole := NewReader(io.NopCloser(bytes.NewReader(data)), opts)
				outWhole := drain(t, whole, 1<<16)
				rng := rand.New(rand.NewSource(seed))
				parts := NewReader(&chunkBody{data: data, next: func() int { return 1 + rng.Intn(9) }}, opts)
				outParts := drain(t, parts, 1+int(uint64(seed)%37))
				if !bytes.Equal(outWhole, outParts) {
					t.Fatalf("%v strip=%v: output depends on the split", fam, strip)
				}
				if uw, up := whole.Usage(), parts.Usage(); uw != up {
					t.Fatalf("%v strip=%v: usage depends on the split:\nwhole %+v\nparts %+v", fam, strip, uw, up)
				}
				if !strip && !bytes.Equal(outWhole, data) {
					t.Fatalf("%v: body changed without stripping", fam)
				}
				if strip && (len(outWhole) > len(data) || !bytes.Contains(data, []byte(`"usage"`)) && !bytes.Equal(outWhole, data)) {
					t.Fatalf("%v: stripping changed a body it should not have", fam)
				}
			}
		}
	})
}

// FuzzRequest checks that the request helpers never panic and that an
// added include_usage leaves a valid body valid.
func FuzzRequest(f *testing.F) {
	f.Add([]byte(`{"model":"gpt-4o","stream":true}`))
	f.Add([]byte(`{"stream":true,"stream_options":{"include_usage":false}}`))
	f.Add([]byte(`{"stream":true,"stream_options":null}`))
	f.Add([]byte(`{"stream":true,"stream_options":{}}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		InspectRequest(body)
		out, added := EnsureStreamUsage(body)
		if want, wantAdded := ensureStreamUsageScan(body); added != wantAdded || !bytes.Equal(out, want) {
			t.Fatalf("%q: EnsureStreamUsage %q %v, the scan %q %v", body, out, added, want, wantAdded)
		}
		if !added {
			if !bytes.Equal(out, body) {
				t.Fatal("changed without adding")
			}
			return
		}
		if json.Valid(body) && !json.Valid(out) {
			t.Fatalf("valid %q became invalid %q", body, out)
		}
		if json.Valid(body) {
			if ri := InspectRequest(out); !ri.IncludeUsage {
				t.Fatalf("%q: include_usage not set in %q", body, out)
			}
		}
	})
}
