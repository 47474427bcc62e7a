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
// before its content), except for Gemini, whose modelVersion follows the
// candidates, where the last one wins; every usage object is decoded and its fields
// override earlier ones, so the last (final) counts win. A key only
// counts where JSON allows one, after '{' or ',', so a key-like text inside
// a string (where its quotes are escaped) never matches.

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
	pctx      [2]bool // whether that key's opening quote can open a key
	lastByte  byte    // the last byte of the stream so far that is not white space
	lastModel bool    // the last model value wins (Gemini), not the first

	c     counts
	objs  int // usage objects seen
	found bool
	model []byte // raw model value, quotes included; points into mbuf or its own copy
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
			p, k := s.nextKey(c, i, idleFrom)
			if p < 0 {
				i = len(c)
				continue
			}
			s.cur, s.st = k, stBeforeVal
			i = p + 1
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
	if s.st == stIdle && !s.keyAtEnd(c, idleFrom) {
		s.notePartials(c, idleFrom)
	}
	s.noteTail(c)
}

// noteTail records the last byte of the stream that is not white space.
func (s *sniffer) noteTail(c []byte) {
	for j := len(c) - 1; j >= 0; j-- {
		if !isSpace(c[j]) {
			s.lastByte = c[j]
			return
		}
	}
}

// keyContext reports whether the quote at c[p] can open an object key:
// only '{' or ',' (and white space) may come before it. That also rules
// out a quote inside a string, which would be escaped, and the closing
// quote of another string.
func (s *sniffer) keyContext(c []byte, p int) bool {
	j := p - 1
	for j >= 0 && isSpace(c[j]) {
		j--
	}
	b := s.lastByte
	if j >= 0 {
		b = c[j]
	}
	return b == '{' || b == ','
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
		s.pctx[k] = s.keyContext(c, q)
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
			if bytes.HasPrefix(c, []byte(need)) && s.pctx[k] {
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

// nextKey finds the next member whose key is one the sniffer wants: it
// looks at each colon from c[i] on (one IndexByte pass finds both keys)
// and checks the quoted key before it, which must start at or after lo.
// It returns the colon's index and which key, or -1.
func (s *sniffer) nextKey(c []byte, i, lo int) (int, int) {
	for i < len(c) {
		q := bytes.IndexByte(c[i:], ':')
		if q < 0 {
			return -1, 0
		}
		q += i
		i = q + 1
		if k := s.keyBefore(c, q, lo); k >= 0 {
			return q, k
		}
	}
	return -1, 0
}

// keyBefore returns which wanted key ends just before c[end] (white space
// allowed in between) and starts at or after lo, or -1.
func (s *sniffer) keyBefore(c []byte, end, lo int) int {
	j := end - 1
	for j >= lo && isSpace(c[j]) {
		j--
	}
	if j < lo || c[j] != '"' {
		return -1
	}
	for k, key := range s.keys {
		if k == keyModel && s.modelDone {
			continue
		}
		st := j + 1 - len(key)
		if st >= lo && string(c[st:j+1]) == key && s.keyContext(c, st) {
			return k
		}
	}
	return -1
}

// keyAtEnd reports whether c ends with a wanted key (and perhaps white
// space) whose colon is still to come; if so it waits for the colon.
func (s *sniffer) keyAtEnd(c []byte, lo int) bool {
	k := s.keyBefore(c, len(c), lo)
	if k < 0 {
		return false
	}
	s.cur, s.st = k, stAfterKey
	s.partial = [2]int{}
	return true
}

// scanValue follows the value from c[i]; it returns the index just past the
// value's end, or -1 when the value goes on past c.
func (s *sniffer) scanValue(c []byte, i int) int {
	for i < len(c) {
		if s.inStr {
			if s.esc {
				s.esc = false
				i++
				continue
			}
			for i < len(c) && !strSpecial[c[i]] {
				i++
			}
			if i == len(c) {
				return -1
			}
			if c[i] == '\\' {
				s.esc = true
				i++
				continue
			}
			s.inStr = false
			i++
			if s.depth == 0 {
				return i
			}
			continue
		}
		for i < len(c) && !structural[c[i]] {
			i++
		}
		if i == len(c) {
			return -1
		}
		switch c[i] {
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
		i++
	}
	return -1
}

var structural, strSpecial = func() (a, b [256]bool) {
	for _, c := range `"{}[]` {
		a[c] = true
	}
	b['"'], b['\\'] = true, true
	return
}()

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
	s.objs++
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
