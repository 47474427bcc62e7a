package proxy

import (
	"bufio"
	"bytes"
	"compress/flate"
	"compress/gzip"
	"compress/zlib"
	"context"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Redacted replaces a key's secret, or the team token, wherever the proxy
// scrubs it.
const Redacted = "[redacted]"

// minScrubLen is the shortest secret the proxy searches for in response
// headers and bodies; shorter ones would match ordinary text. Real API keys
// and team tokens are far longer.
const minScrubLen = 8

// smallBody is the largest body (by Content-Length) that is scrubbed in
// memory, keeping an exact Content-Length; larger or unknown-length bodies
// are scrubbed as they stream (and lose their Content-Length).
const smallBody = 64 << 10

// patternSet is every spelling of one secret the scrubber searches for.
// It is immutable once built.
//
// Bodies are searched with a sampled multi-pattern filter (Rabin–Karp with
// a fixed 8-byte window): every pattern is at least stride+7 bytes long, so
// any occurrence covers an 8-byte window starting at a multiple of stride
// at one of its first stride offsets. The hashes of those windows are
// bits in win; a body is read 8 bytes every stride bytes, and only a
// window whose bit is set is checked against the patterns ents names.
// The cost is one load, multiply and bit test per stride bytes, whatever
// the number of patterns.
type patternSet struct {
	pats   [][]byte
	spats  []string // pats as strings, for headers
	maxLen int
	minLen int
	stride int
	first  [256]bool    // first[c]: some pattern begins with c
	in     [256]bool    // in[c]: some pattern holds c
	pair   [1024]uint64 // bit c0<<8|c1: some pattern begins with c0 c1
	win    [256]uint64  // bit winHash(w): w is a sampled window of a pattern
	ents   map[uint16][]winEntry
}

// winEntry says that pattern pat has, at offset off, a window of some hash.
type winEntry struct{ pat, off uint16 }

// window is the filter's window length.
const window = 8

func winHash(x uint64) uint16 { return uint16((x * 0x9E3779B97F4A7C15) >> 50) }

// index builds the filter once every pattern is in.
func (ps *patternSet) index() {
	ps.minLen = len(ps.pats[0])
	for _, p := range ps.pats {
		ps.minLen = min(ps.minLen, len(p))
	}
	ps.stride = min(ps.minLen-window+1, window)
	ps.ents = make(map[uint16][]winEntry)
	for i, p := range ps.pats {
		ps.first[p[0]] = true
		for _, c := range p {
			ps.in[c] = true
		}
		pr := uint16(p[0])<<8 | uint16(p[1])
		ps.pair[pr>>6] |= 1 << (pr & 63)
		for off := 0; off < ps.stride; off++ {
			h := winHash(binary.LittleEndian.Uint64(p[off:]))
			ps.win[h>>6] |= 1 << (h & 63)
			ps.ents[h] = append(ps.ents[h], winEntry{uint16(i), uint16(off)})
		}
	}
}

// sets caches the pattern sets of the secrets seen (keys and team tokens),
// so that a request builds none; it is emptied when it holds setCacheMax.
var sets struct {
	mu sync.Mutex // protects m
	m  map[string]*patternSet
}

const setCacheMax = 4096

// setFor returns the pattern set of secret, or nil when secret is too short
// to be searched for.
func setFor(secret string) *patternSet {
	if len(secret) < minScrubLen {
		return nil
	}
	sets.mu.Lock()
	ps := sets.m[secret]
	sets.mu.Unlock()
	if ps != nil {
		return ps
	}
	ps = &patternSet{}
	add := func(s string) {
		for _, sp := range spellings(s) {
			p := []byte(sp)
			if len(p) >= window && !containsBytes(ps.pats, p) {
				ps.pats = append(ps.pats, p)
				ps.spats = append(ps.spats, sp)
				ps.maxLen = max(ps.maxLen, len(p))
			}
		}
	}
	add(secret)
	// A basic-auth secret user:password: the password alone is secret too.
	if _, pw, ok := strings.Cut(secret, ":"); ok && len(pw) >= minScrubLen {
		add(pw)
	}
	ps.index()
	sets.mu.Lock()
	if sets.m == nil || len(sets.m) >= setCacheMax {
		sets.m = make(map[string]*patternSet)
	}
	sets.m[secret] = ps
	sets.mu.Unlock()
	return ps
}

func containsBytes(list [][]byte, p []byte) bool {
	for _, q := range list {
		if bytes.Equal(q, p) {
			return true
		}
	}
	return false
}

// spellings returns how s may be spelled in an answer: as is;
// percent-encoded as Go's QueryEscape and PathEscape, RFC 3986 (Python's
// quote), JavaScript's encodeURIComponent and Java's URLEncoder do it, with
// upper- and lower-case hex; JSON-escaped with and without HTML escapes
// (\u0026, \u003c, \u003e, upper- and lower-case hex), escaped slashes
// (\/) and ASCII-only escapes; and base64 (standard and URL alphabets) at
// each of the three alignments s can have inside a longer encoded string
// (user:s, s:, a header or a JSON document): the run of base64 characters
// that depends on s alone, without padding. Every spelling is at least as
// long as minScrubLen.
func spellings(s string) []string {
	out := []string{s}
	add := func(v string) {
		if len(v) >= minScrubLen {
			for _, o := range out {
				if o == v {
					return
				}
			}
			out = append(out, v)
		}
	}
	for _, keep := range urlKeeps {
		for _, plus := range []bool{false, true} {
			for _, lower := range []bool{false, true} {
				add(percentEncode(s, keep, plus, lower))
			}
		}
	}
	add(url.QueryEscape(s))
	add(url.PathEscape(s))
	for f := jsonFlags(0); f < jsonAll; f++ {
		add(jsonEscape(s, f))
	}
	for i := 0; i < 3 && i < len(s); i++ {
		part := s[i:]
		part = part[:len(part)/3*3]
		if len(part) < 6 {
			break
		}
		add(b64std.EncodeToString([]byte(part)))
		add(b64url.EncodeToString([]byte(part)))
	}
	return out
}

var (
	b64std = base64.StdEncoding
	b64url = base64.URLEncoding
)

// urlKeeps are the bytes percent-encoders leave alone beyond ALPHA and
// DIGIT: RFC 3986's unreserved, encodeURIComponent's, Go's PathEscape's,
// Python quote's default (keeps "/") and Java URLEncoder's.
var urlKeeps = []string{"-._~", "-_.!~*'()", "-._~:@&=+$", "-._~/", ".-*_"}

func percentEncode(s, keep string, plusSpace, lower bool) string {
	hex := "0123456789ABCDEF"
	if lower {
		hex = "0123456789abcdef"
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', strings.IndexByte(keep, c) >= 0:
			b.WriteByte(c)
		case c == ' ' && plusSpace:
			b.WriteByte('+')
		default:
			b.WriteByte('%')
			b.WriteByte(hex[c>>4])
			b.WriteByte(hex[c&15])
		}
	}
	return b.String()
}

// jsonFlags selects a JSON string escaping style.
type jsonFlags int

const (
	jsonHTML  jsonFlags = 1 << iota // <, >, & as \u003c, \u003e, \u0026
	jsonUpper                       // upper-case hex in \u escapes
	jsonSlash                       // / as \/
	jsonASCII                       // non-ASCII as \u escapes
	jsonAll
)

func jsonEscape(s string, f jsonFlags) string {
	hex := "0123456789abcdef"
	if f&jsonUpper != 0 {
		hex = "0123456789ABCDEF"
	}
	var b strings.Builder
	u := func(r rune) {
		b.WriteString(`\u`)
		for shift := 12; shift >= 0; shift -= 4 {
			b.WriteByte(hex[(r>>shift)&15])
		}
	}
	for _, r := range s {
		switch {
		case r == '"' || r == '\\':
			b.WriteByte('\\')
			b.WriteRune(r)
		case r == '\n':
			b.WriteString(`\n`)
		case r == '\r':
			b.WriteString(`\r`)
		case r == '\t':
			b.WriteString(`\t`)
		case r < 0x20, r == 0x2028, r == 0x2029:
			u(r)
		case f&jsonHTML != 0 && (r == '<' || r == '>' || r == '&'):
			u(r)
		case f&jsonSlash != 0 && r == '/':
			b.WriteString(`\/`)
		case f&jsonASCII != 0 && r > 0x7f:
			if r > 0xffff {
				r -= 0x10000
				u(0xd800 + (r>>10)&0x3ff)
				u(0xdc00 + r&0x3ff)
			} else {
				u(r)
			}
		default:
			b.WriteRune(r)
		}
	}
	return b.String()
}

// matcher finds the spellings of up to two secrets: a key (and, for a
// user:password key, its password) and the team token the request came
// with. It is a value: building one allocates
// nothing.
type matcher struct{ sets [2]*patternSet }

func newMatcher(a, b *patternSet) matcher { return matcher{sets: [2]*patternSet{a, b}} }

func (m *matcher) empty() bool { return m.sets[0] == nil && m.sets[1] == nil }

func (m *matcher) maxLen() int {
	n := 0
	for _, s := range m.sets {
		if s != nil {
			n = max(n, s.maxLen)
		}
	}
	return n
}

// stride is the sampling step of the filter: the smallest of the sets'.
func (m *matcher) stride() int {
	st := window
	for _, s := range m.sets {
		if s != nil {
			st = min(st, s.stride)
		}
	}
	return st
}

// find returns the leftmost match in b, the longest of those starting at
// the same byte, as b[i:j]; i is -1 when there is none.
func (m *matcher) find(b []byte) (i, j int) { return findIn(m, b) }

// findString is find for a string.
func (m *matcher) findString(b string) (i, j int) { return findIn(m, b) }

// findIn is find for a string or a byte slice. See [patternSet] for the
// filter: a match starting at st is seen at the first sample at or after
// st, so the first sample that verifies holds the leftmost match.
func findIn[T string | []byte](m *matcher, b T) (i, j int) {
	stride := m.stride()
	s0, s1 := m.sets[0], m.sets[1]
	for k := 0; k+window <= len(b); k += stride {
		x := uint64(b[k]) | uint64(b[k+1])<<8 | uint64(b[k+2])<<16 | uint64(b[k+3])<<24 |
			uint64(b[k+4])<<32 | uint64(b[k+5])<<40 | uint64(b[k+6])<<48 | uint64(b[k+7])<<56
		h := winHash(x)
		bit := uint64(1) << (h & 63)
		if (s0 == nil || s0.win[h>>6]&bit == 0) && (s1 == nil || s1.win[h>>6]&bit == 0) {
			continue
		}
		i, j = -1, -1
		for _, s := range m.sets {
			if s == nil {
				continue
			}
			for _, e := range s.ents[h] {
				p := s.spats[e.pat]
				st := k - int(e.off)
				if st < 0 || st+len(p) > len(b) || (i >= 0 && (st > i || st == i && st+len(p) <= j)) {
					continue
				}
				if string(b[st:st+len(p)]) == p {
					i, j = st, st+len(p)
				}
			}
		}
		if i >= 0 {
			return i, j
		}
	}
	return -1, -1
}

// pending returns where the longest suffix of b that is a proper prefix of
// some pattern begins, or len(b): the bytes from there on cannot be
// decided yet. Everything before it can be handed out.
func (m *matcher) pending(b []byte) int {
	// A pending tail holds only bytes some pattern holds: start after the
	// last byte that none does (an SSE event's closing newline, say).
	lo := max(0, len(b)-m.maxLen()+1)
	for k := len(b) - 1; k >= lo; k-- {
		if c := b[k]; (m.sets[0] == nil || !m.sets[0].in[c]) && (m.sets[1] == nil || !m.sets[1].in[c]) {
			lo = k + 1
			break
		}
	}
	for k := lo; k < len(b); k++ {
		tail := b[k:]
		for _, s := range m.sets {
			if s == nil || !s.first[tail[0]] {
				continue
			}
			if len(tail) > 1 {
				if pr := uint16(tail[0])<<8 | uint16(tail[1]); s.pair[pr>>6]&(1<<(pr&63)) == 0 {
					continue
				}
			}
			for _, p := range s.pats {
				if len(p) > len(tail) && bytes.Equal(p[:len(tail)], tail) {
					return k
				}
			}
		}
	}
	return len(b)
}

// replace returns b with every match replaced by Redacted; b itself when
// there is none.
func (m *matcher) replace(b []byte) []byte {
	i, j := m.find(b)
	if i < 0 {
		return b
	}
	out := make([]byte, 0, len(b)+len(Redacted))
	for i >= 0 {
		out = append(out, b[:i]...)
		out = append(out, Redacted...)
		b = b[j:]
		i, j = m.find(b)
	}
	return append(out, b...)
}

// replaceString returns s with every match replaced by Redacted.
func (m *matcher) replaceString(s string) string {
	i, j := m.findString(s)
	if i < 0 {
		return s
	}
	var b strings.Builder
	for i >= 0 {
		b.WriteString(s[:i])
		b.WriteString(Redacted)
		s = s[j:]
		i, j = m.findString(s)
	}
	b.WriteString(s)
	return b.String()
}

// keyMatcher returns the matcher for a key's secret and for the team
// token of the request rec records (nil: none).
func keyMatcher(secret string, rec *Record) matcher {
	var tok *patternSet
	if rec != nil {
		tok = rec.tokenSet
	}
	return newMatcher(setFor(secret), tok)
}

// scrubHeader replaces the spellings of secret in every header value;
// a header whose name holds one is removed.
func scrubHeader(h http.Header, secret string) {
	m := newMatcher(setFor(secret), nil)
	scrubHeaderWith(h, &m)
}

func scrubHeaderWith(h http.Header, m *matcher) {
	if m.empty() {
		return
	}
	for k, vs := range h {
		if i, _ := m.findString(k); i >= 0 {
			delete(h, k)
			continue
		}
		for i, v := range vs {
			vs[i] = m.replaceString(v)
		}
	}
}

// scrubBody replaces the spellings of secret in the body of resp, whatever its
// status: in memory when the body is small and of known length (the
// Content-Length is corrected), otherwise as it streams, holding back only
// the bytes that could begin a secret (Content-Length is dropped). Trailers
// are scrubbed when the body ends. Bodies of 101 answers (a WebSocket's
// frames) are not looked into.
func scrubBody(resp *http.Response, secret string) {
	scrubBodyWith(resp, newMatcher(setFor(secret), nil), 0, nil, nil)
}

// scrubBodyWith is scrubBody for the secrets m finds, whose in-memory
// read of a small body gives up when no byte arrives for idle (zero: no
// bound): the body then ends with an error after what did arrive, as a
// streamed body would when its idle timeout passes. With a record (rec)
// and the attempt's cancel, the idle bound is kept by the record's clock
// (canceling the attempt) and the body lives in the record: nothing is
// allocated for either.
func scrubBodyWith(resp *http.Response, m matcher, idle time.Duration, rec *Record, cancel context.CancelCauseFunc) {
	if m.empty() || resp.Body == nil || resp.Body == http.NoBody || resp.StatusCode == http.StatusSwitchingProtocols ||
		(resp.Request != nil && resp.Request.Method == http.MethodHead) {
		return
	}
	decodeBody(resp)
	if resp.ContentLength >= 0 && resp.ContentLength <= smallBody {
		b := make([]byte, resp.ContentLength)
		var src io.Reader = resp.Body
		switch {
		case idle > 0 && rec != nil && cancel != nil:
			rec.idleRead = idleRead{r: resp.Body, rec: rec, idle: idle, cancel: cancel}
			src = &rec.idleRead
		case idle > 0:
			w := newIdleWatch(resp.Body, idle)
			defer w.stop()
			src = w
		}
		n, err := io.ReadFull(src, b)
		b = b[:n]
		if err == nil {
			// Content-Length was exact: the next read ends the body (and
			// fills in its trailers).
			var one [1]byte
			var k int
			k, err = resp.Body.Read(one[:])
			if k > 0 {
				err = errors.New("proxy: upstream body longer than its Content-Length")
			} else if err == io.EOF {
				err = nil
			}
		}
		_ = resp.Body.Close()
		b = m.replace(b)
		scrubHeaderWith(resp.Trailer, &m)
		if err != nil {
			resp.Body = io.NopCloser(io.MultiReader(bytes.NewReader(b), errReader{err}))
			return
		}
		var mb *memBody
		if rec != nil {
			mb, rec.inMemory = &rec.mem, true
		} else {
			mb = new(memBody) // allocated only here: with a record, the record's is used
		}
		mb.Reset(b)
		resp.Body = mb
		changed := resp.ContentLength != int64(len(b))
		resp.ContentLength = int64(len(b))
		if changed && resp.Header.Get("Content-Length") != "" {
			resp.Header.Set("Content-Length", strconv.Itoa(len(b)))
		}
		return
	}
	resp.Body = &scrubReader{rc: resp.Body, m: m, trailer: resp.Trailer}
	resp.ContentLength = -1
	resp.Header.Del("Content-Length")
}

// errUndecodable ends an answer whose Content-Encoding keypoold cannot
// decode, and so cannot scrub.
var errUndecodable = errors.New("proxy: upstream answer in a content encoding keypool cannot scrub")

// decodeBody makes resp's body plain when the upstream encoded it although
// identity was asked for, so that it can be scrubbed (and is sent
// decoded): every gzip, x-gzip and deflate layer, over however many
// Content-Encoding lines, is undone. A body in any other encoding is not
// sent: it ends at once with errUndecodable.
func decodeBody(resp *http.Response) {
	var encs []string
	for _, line := range resp.Header.Values("Content-Encoding") {
		for _, e := range strings.Split(line, ",") {
			if e = strings.ToLower(strings.TrimSpace(e)); e != "" && e != "identity" {
				encs = append(encs, e)
			}
		}
	}
	resp.Header.Del("Content-Encoding")
	if len(encs) == 0 {
		return
	}
	resp.ContentLength = -1
	resp.Uncompressed = true
	for i := len(encs) - 1; i >= 0; i-- {
		switch encs[i] {
		case "gzip", "x-gzip", "deflate":
		default:
			resp.Body = &decodedBody{rc: resp.Body, err: errUndecodable}
			return
		}
	}
	var r io.Reader = resp.Body
	for i := len(encs) - 1; i >= 0; i-- {
		r = &lazyDecoder{src: r, enc: encs[i]}
	}
	resp.Body = &decodedBody{rc: resp.Body, r: r}
}

// decodedBody reads r (or fails with err) and closes rc.
type decodedBody struct {
	rc  io.ReadCloser
	r   io.Reader
	err error
}

func (d *decodedBody) Read(p []byte) (int, error) {
	if d.err != nil {
		return 0, d.err
	}
	return d.r.Read(p)
}

func (d *decodedBody) Close() error { return d.rc.Close() }

// lazyDecoder undoes one encoding layer of src, reading its header on the
// first Read. "deflate" is zlib-wrapped as HTTP says, or raw as some
// servers send it.
type lazyDecoder struct {
	src io.Reader
	enc string
	r   io.Reader
	err error
}

func (z *lazyDecoder) Read(p []byte) (int, error) {
	if z.r == nil && z.err == nil {
		switch z.enc {
		case "deflate":
			br := bufio.NewReader(z.src)
			h, err := br.Peek(2)
			if err == nil && h[0]&0x0f == 8 && (uint16(h[0])<<8|uint16(h[1]))%31 == 0 {
				z.r, z.err = zlib.NewReader(br)
			} else {
				z.r = flate.NewReader(br)
			}
		default:
			z.r, z.err = gzip.NewReader(z.src)
		}
	}
	if z.err != nil {
		return 0, z.err
	}
	return z.r.Read(p)
}

// memBody is a scrubbed body held in memory.
type memBody struct{ bytes.Reader }

func (*memBody) Close() error { return nil }

type errReader struct{ err error }

func (e errReader) Read([]byte) (int, error) { return 0, e.err }

// scrubBufSize is the size of a streamed scrub's buffer: it holds what one
// upstream read returns plus the held-back tail. Small, since a stream
// keeps its buffer while it lasts (512 streams hold 4 MiB), and
// ReverseProxy copies from it with its own 32 KiB buffer.
const scrubBufSize = 8 << 10

// scrubBuffers recycles the buffers of streamed scrubs.
var scrubBuffers = sync.Pool{New: func() any { return new([scrubBufSize]byte) }}

// scrubReader replaces secrets in a stream. Of what it has read it hands
// out at once everything that cannot be part of a match, holding back only
// the longest tail that begins some spelling (at most the longest
// spelling's length minus one), so that a secret split across reads is
// caught and an SSE event is never held for the next one. Read and Close
// may be called from different goroutines; Read is not called
// concurrently with itself.
type scrubReader struct {
	rc      io.ReadCloser
	m       matcher
	trailer http.Header // scrubbed when the body ends

	buf  []byte              // arr's, or larger for long secrets
	arr  *[scrubBufSize]byte // from scrubBuffers; returned when the body ends
	off  int                 // buf[off:end] is read and not yet handed out
	end  int
	safe int   // buf[off:safe] can be handed out as it is
	cut  int   // when > 0, a match spans buf[safe:cut]: the marker goes out instead
	mark int   // bytes of the marker still to hand out
	err  error // the upstream's error (io.EOF at the end), returned once all is out
	done bool  // the end was handed out and buf returned
}

func (s *scrubReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	for {
		switch {
		case s.done:
			return 0, s.err
		case s.mark > 0:
			n := copy(p, Redacted[len(Redacted)-s.mark:])
			s.mark -= n
			return n, nil
		case s.off < s.safe:
			n := copy(p, s.buf[s.off:s.safe])
			s.off += n
			return n, nil
		case s.cut > 0:
			s.off, s.safe, s.cut, s.mark = s.cut, s.cut, 0, len(Redacted)
		case s.scan():
		case s.err != nil:
			s.finish()
			return 0, s.err
		default:
			s.fill()
		}
	}
}

// scan decides what of buf[off:end] can go out, reporting whether any can.
func (s *scrubReader) scan() bool {
	data := s.buf[s.off:s.end]
	if len(data) == 0 {
		return false
	}
	hold := len(data)
	if s.err == nil {
		hold = s.m.pending(data)
	}
	if i, j := s.m.find(data); i >= 0 && i < hold {
		s.safe, s.cut = s.off+i, s.off+j
		return true
	}
	if hold > 0 {
		s.safe = s.off + hold
		return true
	}
	return false
}

// fill moves the held-back bytes to the front and reads more after them.
func (s *scrubReader) fill() {
	if s.buf == nil {
		if need := 2*s.m.maxLen() + 4096; need <= scrubBufSize {
			s.arr = scrubBuffers.Get().(*[scrubBufSize]byte)
			s.buf = s.arr[:]
		} else {
			s.buf = make([]byte, need)
		}
	}
	if s.off > 0 {
		s.end = copy(s.buf, s.buf[s.off:s.end])
		s.off, s.safe = 0, 0
	}
	n, err := s.rc.Read(s.buf[s.end:])
	s.end += n
	if err != nil {
		s.err = err
	}
}

func (s *scrubReader) finish() {
	s.done = true
	if s.err == io.EOF {
		scrubHeaderWith(s.trailer, &s.m)
	}
	if s.arr != nil {
		scrubBuffers.Put(s.arr)
		s.arr = nil
	}
	s.buf = nil
}

// Close closes the upstream body. The buffer is left to the collector
// unless the body was read to its end: Close may run beside a Read.
func (s *scrubReader) Close() error { return s.rc.Close() }

// redactError returns err with the spellings of secret replaced wherever
// its message holds them. A *url.Error keeps its type (its URL redacted);
// any other error whose message holds the secret becomes a *redactedError
// that keeps only its message (redacted), whether it timed out, and
// whether it is a context cancellation or deadline.
func redactError(err error, secret string) error {
	m := newMatcher(setFor(secret), nil)
	if err == nil || m.empty() {
		return err
	}
	msg := err.Error()
	red := m.replaceString(msg)
	if red == msg {
		return err
	}
	var ue *url.Error
	if errors.As(err, &ue) && err == error(ue) {
		return &url.Error{Op: ue.Op, URL: m.replaceString(ue.URL), Err: redactError(ue.Err, secret)}
	}
	re := &redactedError{msg: red}
	var te interface{ Timeout() bool }
	re.timeout = errors.As(err, &te) && te.Timeout()
	switch {
	case errors.Is(err, context.Canceled):
		re.cause = context.Canceled
	case errors.Is(err, context.DeadlineExceeded):
		re.cause = context.DeadlineExceeded
	}
	return re
}

// redactedError stands in for an error whose message held a secret.
type redactedError struct {
	msg     string
	timeout bool
	cause   error
}

func (e *redactedError) Error() string { return e.msg }
func (e *redactedError) Timeout() bool { return e.timeout }
func (e *redactedError) Unwrap() error { return e.cause }

// idleWatch closes a body when no read returns for idle, so that a
// stalled upstream cannot hold an in-memory read forever.
type idleWatch struct {
	rc    io.ReadCloser
	idle  time.Duration
	timer *time.Timer
}

func newIdleWatch(rc io.ReadCloser, idle time.Duration) *idleWatch {
	w := &idleWatch{rc: rc, idle: idle}
	w.timer = time.AfterFunc(idle, func() { _ = rc.Close() })
	return w
}

func (w *idleWatch) Read(p []byte) (int, error) {
	n, err := w.rc.Read(p)
	if n > 0 {
		w.timer.Reset(w.idle)
	}
	return n, err
}

func (w *idleWatch) stop() { w.timer.Stop() }

// watchIdle returns rc whose reads wait at most idle each: when no byte
// arrives for idle, rc is closed and the pending read fails.
func watchIdle(rc io.ReadCloser, idle time.Duration) io.ReadCloser {
	return idleCloser{newIdleWatch(rc, idle)}
}

// idleCloser is an idleWatch that stops watching when it is closed.
type idleCloser struct{ *idleWatch }

func (c idleCloser) Close() error {
	c.stop()
	return c.rc.Close()
}
