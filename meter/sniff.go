package meter

import (
	"bytes"
	"sync"
)

// A sniffer finds token usage and the model name in a byte stream fed to it
// chunk by chunk, whatever the framing (one JSON document, an SSE stream, a
// streamed JSON array) and wherever the chunks are split. It looks for the
// quoted keys of its family ("usage" and "model", or "usageMetadata" and
// "modelVersion") with a byte search, and only then follows the value with
// a small state machine. It copies nothing except a value that straddles
// two chunks, and then only that value, up to a bound.
//
// The first string-valued model key wins (a response names its model
// before its content); every usage object is decoded and its fields
// override earlier ones, so the last (final) counts win. A usage key
// inside a string cannot match: its closing quote would be escaped.

const (
	maxUsageValue = 16 << 10 // a usage object larger than this is ignored
	maxModelValue = 256      // a model name longer than this is ignored
	capBufSize    = 1 << 10  // initial size of a pooled capture buffer
)

type sniffState uint8

const (
	stIdle      sniffState = iota // searching for a key
	stAfterKey                    // key seen, expecting ':'
	stBeforeVal                   // ':' seen, expecting the value
	stValue                       // inside the value
)

const (
	keyUsage = iota
	keyModel
)

var capPool = sync.Pool{New: func() any { b := make([]byte, 0, capBufSize); return &b }}

// counts holds raw counters as the family reports them.
type counts struct {
	input, output, cached, cacheWrite, thoughts, toolPrompt int64
}

type sniffer struct {
	family    Family
	keys      [2]string // quoted usage and model keys
	modelDone bool

	st      sniffState
	cur     int // keyUsage or keyModel
	depth   int
	inStr   bool
	esc     bool
	inChunk bool // the value started in the current chunk, at valStart
	cap     *[]byte

	partial   [2]int  // bytes of each key that ended the previous chunk
	pesc      [2]bool // whether that key's opening quote was escaped
	tailOdd   bool    // the stream so far ends in an odd run of backslashes
	lastModel bool    // the last model value wins (Gemini), not the first

	c     counts
	found bool
	model []byte // raw model value, quotes included; points into modelBuf
	mbuf  [64]byte
}

func (s *sniffer) init(f Family) {
	s.family = f
	switch f {
	case FamilyGemini:
		s.keys = [2]string{`"usageMetadata"`, `"modelVersion"`}
		s.lastModel = true // modelVersion follows the candidates
	default:
		s.keys = [2]string{`"usage"`, `"model"`}
	}
}

// feed observes the next chunk of the stream.
func (s *sniffer) feed(c []byte) {
	if s.family == FamilyNone || len(c) == 0 {
		return
	}
	i := 0
	if s.st == stIdle && (s.partial[0] > 0 || s.partial[1] > 0) {
		var done bool
		if i, done = s.junction(c); done {
			s.noteTail(c)
			return
		}
	}
	valStart, idleFrom := 0, i
	for i < len(c) {
		switch s.st {
		case stIdle:
			j, k := s.nextKey(c, i)
			if j < 0 {
				i = len(c)
				continue
			}
			s.cur, s.st = k, stAfterKey
			i = j + len(s.keys[k])
		case stAfterKey:
			i = skipSpace(c, i)
			if i == len(c) {
				continue
			}
			if c[i] != ':' {
				s.st, idleFrom = stIdle, i
				continue
			}
			s.st = stBeforeVal
			i++
		case stBeforeVal:
			i = skipSpace(c, i)
			if i == len(c) {
				continue
			}
			want := byte('{')
			if s.cur == keyModel {
				want = '"'
			}
			if c[i] != want {
				s.st, idleFrom = stIdle, i
				continue
			}
			s.st, s.depth, s.inStr, s.esc = stValue, 0, false, false
			s.inChunk, valStart = true, i
		case stValue:
			end := s.scanValue(c, i)
			if end < 0 {
				from := i
				if s.inChunk {
					from = valStart
				}
				if !s.capture(c[from:]) {
					s.st = stIdle // too large: give up on this value
					idleFrom = len(c)
				}
				s.inChunk = false
				i = len(c)
				continue
			}
			var val []byte
			if s.inChunk {
				if end-valStart <= s.limit() {
					val = c[valStart:end]
				}
			} else if s.capture(c[i:end]) {
				val = *s.cap
			}
			if val != nil {
				s.handle(val)
			}
			if s.cap != nil {
				*s.cap = (*s.cap)[:0]
			}
			s.st, s.inChunk = stIdle, false
			i, idleFrom = end, end
		}
	}
	if s.st == stIdle {
		s.notePartials(c, idleFrom)
	}
	s.noteTail(c)
}

// noteTail records the parity of the backslashes that end the stream, so
// that a quote at the start of the next chunk is known escaped or not.
func (s *sniffer) noteTail(c []byte) {
	n := 0
	for n < len(c) && c[len(c)-1-n] == '\\' {
		n++
	}
	if n == len(c) {
		s.tailOdd = s.tailOdd != (n%2 == 1)
		return
	}
	s.tailOdd = n%2 == 1
}

// escapedAt reports whether c[p] is preceded by an odd number of
// backslashes, counting those that ended the previous chunks.
func (s *sniffer) escapedAt(c []byte, p int) bool {
	n := 0
	for j := p - 1; j >= 0 && c[j] == '\\'; j-- {
		n++
	}
	odd := n%2 == 1
	if n == p && s.tailOdd {
		odd = !odd
	}
	return odd
}

// notePartials remembers, for each key, how much of it the end of c (from
// index from on) spells, so that a key split across chunks is found.
func (s *sniffer) notePartials(c []byte, from int) {
	for k, key := range s.keys {
		s.partial[k] = 0
		if k == keyModel && s.modelDone {
			continue
		}
		lo := max(from, len(c)-len(key)+1)
		q := -1
		for j := len(c) - 1; j >= lo; j-- {
			if c[j] == '"' {
				q = j
				break
			}
		}
		if q < 0 || !bytes.HasPrefix([]byte(key), c[q:]) {
			continue
		}
		s.partial[k] = len(c) - q
		s.pesc[k] = s.escapedAt(c, q)
	}
}

// junction goes on with keys whose beginning ended the previous chunk. It
// returns where to go on in c, and done == true when all of c was part of
// a key that is still incomplete.
func (s *sniffer) junction(c []byte) (next int, done bool) {
	var ext [2]bool
	for k, key := range s.keys {
		p := s.partial[k]
		if p == 0 {
			continue
		}
		s.partial[k] = 0
		need := key[p:]
		if len(c) >= len(need) {
			if bytes.HasPrefix(c, []byte(need)) && !s.pesc[k] {
				s.partial = [2]int{}
				s.cur, s.st = k, stAfterKey
				return len(need), false
			}
			continue
		}
		if bytes.HasPrefix([]byte(need), c) {
			s.partial[k] = p + len(c)
			ext[k] = true
		}
	}
	return 0, ext[0] || ext[1]
}

// nextKey returns the position in c (from i) of the earliest key still
// wanted, and which key it is; -1 when there is none.
func (s *sniffer) nextKey(c []byte, i int) (int, int) {
	best, bestK := -1, 0
	for k, key := range s.keys {
		if k == keyModel && s.modelDone {
			continue
		}
		from := i
		for from < len(c) {
			p := bytes.Index(c[from:], []byte(key))
			if p < 0 {
				break
			}
			p += from
			if s.escapedAt(c, p) {
				from = p + 1
				continue
			}
			if best < 0 || p < best {
				best, bestK = p, k
			}
			break
		}
	}
	return best, bestK
}

// scanValue follows the value from c[i]; it returns the index just past the
// value's end, or -1 when the value goes on past c.
func (s *sniffer) scanValue(c []byte, i int) int {
	for ; i < len(c); i++ {
		ch := c[i]
		if s.inStr {
			switch {
			case s.esc:
				s.esc = false
			case ch == '\\':
				s.esc = true
			case ch == '"':
				s.inStr = false
				if s.depth == 0 {
					return i + 1
				}
			}
			continue
		}
		switch ch {
		case '"':
			s.inStr = true
		case '{', '[':
			s.depth++
		case '}', ']':
			s.depth--
			if s.depth <= 0 {
				return i + 1
			}
		}
	}
	return -1
}

// handle takes in a complete value of the current key.
func (s *sniffer) handle(val []byte) {
	if s.cur == keyModel {
		if len(val) > 2 && len(val) <= len(s.mbuf) {
			s.model = s.mbuf[:copy(s.mbuf[:], val)]
		} else if len(val) > 2 {
			s.model = append(s.model[:0:0], val...)
		}
		s.modelDone = s.model != nil && !s.lastModel
		return
	}
	if decodeUsage(s.family, val, &s.c) {
		s.found = true
	}
}

// decodeUsage reads the counters of a usage object into c, overriding the
// fields present. It reports whether any counter was present.
func decodeUsage(f Family, obj []byte, c *counts) bool {
	seen := false
	set := func(dst *int64, v []byte) {
		if n, ok := parseInt(v); ok {
			*dst = n
			seen = true
		}
	}
	eachMember(obj, func(k, v []byte, _, _, _ int) bool {
		switch f {
		case FamilyGemini:
			switch string(k) {
			case "promptTokenCount":
				set(&c.input, v)
			case "candidatesTokenCount":
				set(&c.output, v)
			case "cachedContentTokenCount":
				set(&c.cached, v)
			case "thoughtsTokenCount":
				set(&c.thoughts, v)
			case "toolUsePromptTokenCount":
				set(&c.toolPrompt, v)
			}
		case FamilyAnthropic:
			switch string(k) {
			case "input_tokens":
				set(&c.input, v)
			case "output_tokens":
				set(&c.output, v)
			case "cache_read_input_tokens":
				set(&c.cached, v)
			case "cache_creation_input_tokens":
				set(&c.cacheWrite, v)
			}
		default:
			switch string(k) {
			case "prompt_tokens", "input_tokens":
				set(&c.input, v)
			case "completion_tokens", "output_tokens":
				set(&c.output, v)
			case "prompt_cache_hit_tokens": // DeepSeek
				set(&c.cached, v)
			case "prompt_tokens_details", "input_tokens_details":
				eachMember(v, func(k, v []byte, _, _, _ int) bool {
					if string(k) == "cached_tokens" {
						set(&c.cached, v)
					}
					return true
				})
			}
		}
		return true
	})
	return seen
}

// result returns the usage seen so far.
func (s *sniffer) result(fallbackModel string, complete bool) Usage {
	u := Usage{Found: s.found, Complete: complete, Model: fallbackModel}
	if s.model != nil {
		if m := s.model[1 : len(s.model)-1]; string(m) != fallbackModel {
			u.Model = jsonString(s.model)
		}
	}
	c := s.c
	switch s.family {
	case FamilyAnthropic:
		u.InputTokens = c.input + c.cached + c.cacheWrite
		u.CachedTokens = c.cached
		u.CacheWriteTokens = c.cacheWrite
		u.OutputTokens = c.output
	case FamilyGemini:
		u.InputTokens = c.input + c.toolPrompt
		u.CachedTokens = c.cached
		u.OutputTokens = c.output + c.thoughts
	default:
		u.InputTokens = c.input
		u.CachedTokens = c.cached
		u.OutputTokens = c.output
	}
	return u
}

// release returns pooled memory; the sniffer must not be fed afterwards.
func (s *sniffer) release() {
	if s.cap != nil {
		if cap(*s.cap) <= 4*capBufSize {
			*s.cap = (*s.cap)[:0]
			capPool.Put(s.cap)
		}
		s.cap = nil
	}
	s.family = FamilyNone
}

// capture appends b to the capture buffer; it reports false, and drops the
// buffer's content, when the value grows past its bound.
func (s *sniffer) capture(b []byte) bool {
	limit := s.limit()
	if s.cap == nil {
		s.cap = capPool.Get().(*[]byte)
	}
	if len(*s.cap)+len(b) > limit {
		*s.cap = (*s.cap)[:0]
		return false
	}
	*s.cap = append(*s.cap, b...)
	return true
}

// limit returns the largest value the current key may have.
func (s *sniffer) limit() int {
	if s.cur == keyModel {
		return maxModelValue
	}
	return maxUsageValue
}
