package meter

import (
	"bytes"
	"io"
	"net/http"
	"strings"
	"sync"
)

// Options configures a [Reader].
type Options struct {
	// Family is the upstream's response format. If zero (FamilyNone) the
	// body passes through unobserved and OnDone still fires, with
	// Found == false.
	Family Family
	// Model is the model named by the request (from [InspectRequest] or
	// [ModelFromPath]); Usage.Model falls back to it when the response
	// names none.
	Model string
	// ContentType is the response Content-Type. Stripping (see
	// StripUsageChunk) only happens on text/event-stream.
	ContentType string
	// ContentEncoding is the response Content-Encoding. Anything other
	// than "" or "identity" turns metering and stripping off: a Reader
	// does not decompress (see [NegotiateIdentity]).
	ContentEncoding string
	// StripUsageChunk removes the usage-only chunk of an OpenAI stream
	// (the event whose JSON has "choices":[] and a usage object) from the
	// bytes handed to the caller. Set it when [EnsureStreamUsage] added
	// include_usage to the request, so the client gets the stream it
	// asked for. Usage is still metered from the removed chunk. It only
	// applies to FamilyOpenAI with a text/event-stream ContentType; every
	// other event passes byte for byte, each as soon as its blank line
	// has arrived.
	StripUsageChunk bool
	// CheckShape, with FamilyOpenAI, looks in the answer for the OpenAI
	// shape (a "choices" member, which chat and completion answers and
	// their stream chunks have) and reports it in [Usage.Shaped]; it also
	// counts the text of JSON answers, not only of streams (see
	// [Usage.TextBytes]). Set it when the family was assumed rather than
	// configured or recognised from the URL, so that the answer itself
	// tells an OpenAI-compatible server from any other JSON API.
	CheckShape bool
	// OnDone, if not nil, is called exactly once with the final usage:
	// when a Read returns io.EOF, or else at the first Close. It is called
	// from the goroutine that reads or closes, with no lock held.
	OnDone func(Usage)
}

// Reader wraps a response body and meters it as the proxy's copy loop
// reads it. Read hands out the same bytes the body produced, in the
// caller's buffer, as soon as it gets them; the Reader keeps no copy of
// the body, only a usage object that straddles two reads. When stripping
// (see [Options.StripUsageChunk]) the stream goes through a pooled buffer
// instead, one SSE event at a time. Usage is ready after EOF or Close.
//
// Read and Close may be called from different goroutines; Read must not be
// called concurrently with itself. A Reader must not be copied.
type Reader struct {
	src    io.ReadCloser
	onDone func(Usage)
	model  string
	strip  bool

	mu    sync.Mutex // protects sn, done and usage
	sn    sniffer
	text  *textCounter // OpenAI event streams, and answers whose shape is checked
	shape *keyFinder   // the "choices" key, when the shape is checked
	done  bool
	usage Usage

	sb stripBuf // used by Read only, when strip is set
}

// NewReader returns a Reader metering body as opts describe. A nil body
// reads as empty.
func NewReader(body io.ReadCloser, opts Options) *Reader {
	if body == nil {
		body = http.NoBody
	}
	r := &Reader{src: body, onDone: opts.OnDone, model: opts.Model}
	fam := opts.Family
	if enc := strings.TrimSpace(opts.ContentEncoding); enc != "" && !strings.EqualFold(enc, "identity") {
		fam = FamilyNone
	}
	r.sn.init(fam)
	if fam == FamilyOpenAI && (IsEventStream(opts.ContentType) || opts.CheckShape) {
		r.text = &textCounter{} // streams may lack usage; JSON answers carry it
	}
	if fam == FamilyOpenAI && opts.CheckShape {
		r.shape = &keyFinder{key: `"choices":`}
	}
	r.strip = opts.StripUsageChunk && fam == FamilyOpenAI && IsEventStream(opts.ContentType)
	return r
}

// WrapResponse replaces resp.Body with a metering [Reader] and returns it,
// filling opts.ContentType and opts.ContentEncoding from the response
// headers when they are empty. When it strips, it also drops
// Content-Length, since the body gets shorter. It leaves a 101 Switching
// Protocols response alone and returns nil. Call it from
// httputil.ReverseProxy.ModifyResponse or a RoundTripper.
func WrapResponse(resp *http.Response, opts Options) *Reader {
	if resp == nil || resp.StatusCode == http.StatusSwitchingProtocols {
		return nil
	}
	if opts.ContentType == "" {
		opts.ContentType = resp.Header.Get("Content-Type")
	}
	if opts.ContentEncoding == "" {
		opts.ContentEncoding = resp.Header.Get("Content-Encoding")
	}
	r := NewReader(resp.Body, opts)
	if r.strip {
		resp.Header.Del("Content-Length")
		resp.ContentLength = -1
	}
	resp.Body = r
	return r
}

// Read reads from the wrapped body and meters what it read.
func (r *Reader) Read(p []byte) (int, error) {
	if r.strip {
		return r.readStrip(p)
	}
	n, err := r.src.Read(p)
	r.observe(p[:n], err)
	return n, err
}

// observe feeds b to the sniffer and finishes on io.EOF. It returns how
// many usage objects the sniffer has seen.
func (r *Reader) observe(b []byte, err error) int {
	r.mu.Lock()
	if !r.done {
		r.sn.feed(b)
		if r.text != nil {
			r.text.feed(b)
		}
		if r.shape != nil {
			r.shape.feed(b)
		}
	}
	objs := r.sn.objs
	if err != io.EOF {
		r.mu.Unlock()
		return objs
	}
	fire, u := r.finishLocked(true)
	r.mu.Unlock()
	if fire != nil {
		fire(u)
	}
	return objs
}

// finishLocked settles the usage once; it returns the callback to call, if
// any, after r.mu is released.
func (r *Reader) finishLocked(complete bool) (func(Usage), Usage) {
	if r.done {
		return nil, Usage{}
	}
	r.done = true
	r.usage = r.sn.result(r.model, complete)
	if r.text != nil && !r.usage.Found {
		r.usage.TextBytes = r.text.n
	}
	if r.shape != nil {
		r.usage.Shaped = r.shape.found
	}
	r.sn.release()
	return r.onDone, r.usage
}

// Close closes the wrapped body and, if the body was not read to its end,
// settles the usage seen so far (Complete == false) and calls OnDone.
func (r *Reader) Close() error {
	err := r.src.Close()
	r.mu.Lock()
	fire, u := r.finishLocked(false)
	r.mu.Unlock()
	if fire != nil {
		fire(u)
	}
	return err
}

// Usage returns the final usage once the body has hit EOF or been closed,
// and the usage seen so far before that.
func (r *Reader) Usage() Usage {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.done {
		return r.usage
	}
	return r.sn.result(r.model, false)
}

// Stripping. The stream goes through a buffer so that a usage-only event can
// be held until it is complete and dropped. Each complete event is handed
// out as soon as its blank line arrives; only an incomplete trailing event
// waits for more bytes, which its client could not have used anyway.

const (
	stripBufSize = 32 << 10
	maxEventSize = 1 << 20 // an "event" larger than this turns stripping off
)

var stripPool = sync.Pool{New: func() any { b := make([]byte, stripBufSize); return &b }}

type stripBuf struct {
	buf       *[]byte
	r, rd, w  int // buf[r:rd] is ready for the caller; buf[rd:w] is an incomplete event
	scan      int // next byte of buf[rd:w] to look at for a line end
	lineStart int // start of the current line
	err       error
	pass      bool // stripping gave up: hand everything out
	objs      int  // usage objects the sniffer had seen at the last read
	check     bool // a usage object arrived: look at each event
}

// readyAll marks every complete event ready without looking into them:
// until the sniffer sees a usage object, no event can be a usage chunk.
// It only searches bytes it has not searched before (s.scan on).
func (s *stripBuf) readyAll() {
	from := max(s.rd, s.scan-2)
	b := (*s.buf)[from:s.w]
	s.scan = s.w
	for end := len(b); end > 0; {
		k := bytes.LastIndexByte(b[:end], '\n')
		if k < 1 {
			return
		}
		// Is the line ending at b[k] empty?
		if b[k-1] == '\n' || b[k-1] == '\r' && k >= 2 && b[k-2] == '\n' {
			s.rd = from + k + 1
			return
		}
		end = k
	}
}

func (r *Reader) readStrip(p []byte) (int, error) {
	s := &r.sb
	for {
		if s.r < s.rd {
			n := copy(p, (*s.buf)[s.r:s.rd])
			s.r += n
			return n, nil
		}
		if s.err != nil {
			if s.rd < s.w { // a final event without its blank line: pass it on
				s.rd = s.w
				continue
			}
			if s.buf != nil {
				if len(*s.buf) == stripBufSize {
					stripPool.Put(s.buf)
				}
				s.buf = nil
				s.r, s.rd, s.w = 0, 0, 0
			}
			return 0, s.err
		}
		if s.buf == nil {
			s.buf = stripPool.Get().(*[]byte)
		}
		if s.rd > 0 { // keep only the incomplete event, at the front
			b := *s.buf
			copy(b, b[s.rd:s.w])
			s.w -= s.rd
			s.scan -= s.rd
			s.lineStart -= s.rd
			s.r, s.rd = 0, 0
		}
		if len(*s.buf)-s.w < 4<<10 {
			if len(*s.buf) >= maxEventSize {
				s.pass = true
				s.rd = s.w
				continue
			}
			nb := make([]byte, 2*len(*s.buf))
			copy(nb, (*s.buf)[:s.w])
			s.buf = &nb
		}
		b := *s.buf
		n, err := r.src.Read(b[s.w:])
		if objs := r.observe(b[s.w:s.w+n], err); objs != s.objs {
			if !s.check { // look at the pending event from its start
				s.scan, s.lineStart = s.rd, s.rd
			}
			s.objs, s.check = objs, true
		}
		s.w += n
		s.err = err
		switch {
		case s.pass:
			s.rd = s.w
		case s.check:
			s.events()
			s.check = s.rd < s.w // the usage chunk may still be incomplete
		default:
			s.readyAll()
		}
	}
}

// events finds the events completed by the bytes just read, drops the
// usage-only ones and marks the rest ready.
func (s *stripBuf) events() {
	b := *s.buf
	for s.scan < s.w {
		k := bytes.IndexByte(b[s.scan:s.w], '\n')
		if k < 0 {
			s.scan = s.w
			return
		}
		nl := s.scan + k
		line := b[s.lineStart:nl]
		s.scan, s.lineStart = nl+1, nl+1
		if len(line) > 0 && !(len(line) == 1 && line[0] == '\r') {
			continue
		}
		// A blank line: the event b[s.rd:nl+1] is complete.
		if isUsageOnlyEvent(b[s.rd : nl+1]) {
			cut := nl + 1 - s.rd
			copy(b[s.rd:], b[nl+1:s.w])
			s.w -= cut
			s.scan, s.lineStart = s.rd, s.rd
			continue
		}
		s.rd = nl + 1
	}
}

// isUsageOnlyEvent reports whether an SSE event is an OpenAI usage-only
// chunk: a data line whose JSON has a usage object and an empty "choices"
// array. (A Responses API event has no choices and is never stripped.)
func isUsageOnlyEvent(ev []byte) bool {
	if !bytes.Contains(ev, []byte(`"usage"`)) {
		return false
	}
	i := bytes.Index(ev, []byte("data:"))
	if i < 0 {
		return false
	}
	payload := ev[i+len("data:"):]
	u := findKey(payload, `"usage"`)
	if len(u) == 0 || u[0] != '{' {
		return false
	}
	ch := findKey(payload, `"choices"`)
	if len(ch) < 2 || ch[0] != '[' {
		return false
	}
	return skipSpace(ch, 1) == len(ch)-1
}

var _ io.ReadCloser = (*Reader)(nil)
