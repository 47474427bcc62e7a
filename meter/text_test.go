package meter

import "testing"

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
