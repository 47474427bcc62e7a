package meter

import (
	"io"
	"strings"
	"testing"
)

// TestTextCounter: the generated text of an OpenAI-shaped answer is
// counted wherever the chunks split, escapes as one byte; other strings,
// null content and keys ending in "content" are not.
func TestTextCounter(t *testing.T) {
	cases := []struct {
		doc  string
		want int64
	}{
		{`data: {"choices":[{"delta":{"role":"assistant","content":""}}]}` + "\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"Hello\"}}]}\n\n", 5},
		{`{"choices":[{"message":{"role":"assistant","content": "a\"b\\n"}}]}`, 5},
		{`{"choices":[{"text":"abc"}],"content":null}`, 3},
		{`{"reasoning_content":"xxxx","note":"\"content\":\"no"}`, 0},
	}
	for _, c := range cases {
		for split := 0; split <= len(c.doc); split++ {
			var tc textCounter
			tc.feed([]byte(c.doc[:split]))
			tc.feed([]byte(c.doc[split:]))
			if tc.n != c.want {
				t.Errorf("%s split at %d: %d bytes, want %d", c.doc, split, tc.n, c.want)
				break
			}
		}
	}
	if EstimateTokens(120) != 30 || EstimateTokens(1) != 1 || EstimateTokens(0) != 0 {
		t.Error("EstimateTokens")
	}
}

// TestKeyFinder: a member name is found wherever the chunks split; the
// same word as a value or inside an escaped string is not.
func TestKeyFinder(t *testing.T) {
	cases := []struct {
		doc  string
		want bool
	}{
		{`data: {"id":"c1","choices":[{"delta":{"content":"x"}}]}`, true},
		{`{"a":"""choices":1}`, true},
		{`{"result":"choices","note":"\"choices\": no"}`, false},
		{`{"choice":[],"choicess":1}`, false},
	}
	for _, c := range cases {
		for split := 0; split <= len(c.doc); split++ {
			k := keyFinder{key: `"choices":`}
			k.feed([]byte(c.doc[:split]))
			k.feed([]byte(c.doc[split:]))
			if k.found != c.want {
				t.Errorf("%s split at %d: found %v, want %v", c.doc, split, k.found, c.want)
				break
			}
		}
	}
}

// TestReaderCheckShape: with the shape checked, an OpenAI answer (JSON
// with usage, or a stream without) is Shaped, the stream's text counted;
// another JSON API's answer is not Shaped, whatever its keys.
func TestReaderCheckShape(t *testing.T) {
	cases := []struct {
		name, ct, body string
		shaped, found  bool
		text           int64
	}{
		{"openai json", "application/json", `{"object":"chat.completion","choices":[{"message":{"content":"hello"}}],"usage":{"prompt_tokens":7,"completion_tokens":2}}`, true, true, 0},
		{"openai stream without usage", "text/event-stream", "data: {\"choices\":[{\"delta\":{\"content\":\"abcd\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"efgh\"}}]}\n\ndata: [DONE]\n\n", true, false, 8},
		{"other json", "application/json", `{"results":[{"title":"t","text":"some page text"}],"model":"search-v2"}`, false, false, 14},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := NewReader(io.NopCloser(strings.NewReader(c.body)), Options{Family: FamilyOpenAI, ContentType: c.ct, CheckShape: true})
			if _, err := io.Copy(io.Discard, r); err != nil {
				t.Fatal(err)
			}
			u := r.Usage()
			if u.Shaped != c.shaped || u.Found != c.found || u.TextBytes != c.text || !u.Complete {
				t.Errorf("usage %+v, want shaped %v found %v text %d", u, c.shaped, c.found, c.text)
			}
		})
	}
}
