package meter

// textCounter counts the bytes of generated text in an OpenAI-shaped
// answer — the string values of "content" (chat, deltas included) and
// "text" (completions) keys — fed chunk by chunk, wherever the chunks are
// split. It is the basis of the output estimate for a stream that reports
// no usage (an OpenAI-compatible server that ignores
// stream_options.include_usage). Escapes count as one byte each.
type textCounter struct {
	n int64 // text bytes seen
	// pat is the key of textKeys being matched and at how many of its
	// bytes the input so far spells (0: none).
	pat, at int
	// state: 0 looking for a key, 1 after the key's colon (skipping
	// white space), 2 in the string value, 3 in the value just after a
	// backslash.
	state uint8
}

var textKeys = [...]string{`"content":`, `"text":`}

// feed observes the next chunk.
func (t *textCounter) feed(b []byte) {
	for _, c := range b {
		switch t.state {
		case 2:
			switch c {
			case '\\':
				t.state = 3
			case '"':
				t.state = 0
			default:
				t.n++
			}
			continue
		case 3:
			t.n++
			t.state = 2
			continue
		case 1:
			switch c {
			case ' ', '\t', '\r', '\n':
				continue
			case '"':
				t.state = 2
				continue
			}
			t.state = 0 // null, a number, an array: not text
		}
		t.match(c)
	}
}

// match advances the key patterns by one byte.
func (t *textCounter) match(c byte) {
	switch {
	case t.at == 1: // after a quote: the next byte picks the pattern
		switch c {
		case 'c':
			t.pat, t.at = 0, 2
			return
		case 't':
			t.pat, t.at = 1, 2
			return
		}
		t.at = 0
	case t.at > 1:
		if textKeys[t.pat][t.at] == c {
			t.at++
			if t.at == len(textKeys[t.pat]) {
				t.at, t.state = 0, 1
			}
			return
		}
		t.at = 0
	}
	if c == '"' {
		t.at = 1
	}
}

// EstimateTokens estimates the tokens of n bytes of text: one per four
// bytes, rounded up (OpenAI's rule of thumb for English).
func EstimateTokens(n int64) int64 { return (n + 3) / 4 }

// keyFinder reports whether a JSON member name (its quotes and colon
// included, e.g. `"choices":`) occurs in a stream fed chunk by chunk,
// wherever the chunks are split. The name's quotes must be its only ones.
// An escaped quote inside a string value never starts a match.
type keyFinder struct {
	key   string
	at    int // bytes of key matched so far
	found bool
}

// feed observes the next chunk.
func (k *keyFinder) feed(b []byte) {
	if k.found {
		return
	}
	for _, c := range b {
		if k.key[k.at] == c {
			if k.at++; k.at == len(k.key) {
				k.found = true
				return
			}
			continue
		}
		k.at = 0
		if c == '"' {
			k.at = 1
		}
	}
}
