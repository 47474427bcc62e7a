package route

import (
	"net/http"
)

// heldWriter is the ResponseWriter one attempt writes to. It holds the
// status and headers until the attempt's status is known: an answer the
// client should get (see [fallsBack]), or any answer of the last attempt,
// is committed to the client and streamed through; a failure another
// target may mend is dropped, body and all, and nothing reaches the
// client. It unwraps to the client's writer, so flushing, deadlines and
// hijacking reach it.
type heldWriter struct {
	w       http.ResponseWriter
	service []string // the target, the value of HeaderService
	final   bool     // commit whatever comes
	header  http.Header

	status    int  // the status written, 0 until then
	committed bool // the answer went to the client
	wrote     bool // a body byte went to the client
}

// reset makes h the writer of one attempt. The last attempt's answer
// goes to the client whatever it is: its writer holds nothing and writes
// the headers straight into the client's.
func (h *heldWriter) reset(w http.ResponseWriter, service []string, final bool) {
	*h = heldWriter{w: w, service: service, final: final}
	if !final {
		h.header = http.Header{}
	}
}

// Header returns the attempt's own header map until the answer is
// committed (the client's for the last attempt).
func (h *heldWriter) Header() http.Header {
	if h.committed || h.final {
		return h.w.Header()
	}
	return h.header
}

// WriteHeader commits code and the headers to the client, unless the
// answer is a failure a later target may mend.
func (h *heldWriter) WriteHeader(code int) {
	if h.status != 0 {
		return
	}
	if code < 200 && code != http.StatusSwitchingProtocols {
		// 1xx informational answers (103 Early Hints): passed through by
		// the last attempt only.
		if h.final {
			h.w.WriteHeader(code)
		}
		return
	}
	h.status = code
	if !h.final && fallsBack(code) {
		return
	}
	dst := h.w.Header()
	for k, v := range h.header {
		dst[k] = v
	}
	dst[HeaderService] = h.service
	h.committed = true
	h.w.WriteHeader(code)
}

// Write writes to the client once committed and drops the body of a
// held failure.
func (h *heldWriter) Write(p []byte) (int, error) {
	if h.status == 0 {
		h.WriteHeader(http.StatusOK)
	}
	if !h.committed {
		return len(p), nil
	}
	h.wrote = true
	return h.w.Write(p)
}

// FlushError flushes the client's writer once committed.
func (h *heldWriter) FlushError() error {
	if !h.committed {
		return nil
	}
	return http.NewResponseController(h.w).Flush()
}

// Unwrap returns the client's writer.
func (h *heldWriter) Unwrap() http.ResponseWriter { return h.w }

// fallsBack reports whether an attempt's status means its target could
// not serve the request and another target should be tried: 401 and 403
// (the target's keys or the target service refused: a service
// allow-list, a disabled service), 408, 429 (no key available, a budget
// or rate limit of the target service, the upstream's own 429 after
// failover) and every 5xx (the upstream failing on every key, unreachable,
// timed out). Every other 4xx is the request's (400, 404, 413, 422, …)
// and goes to the client at once, as do 1xx, 2xx and 3xx.
func fallsBack(status int) bool {
	switch status {
	case http.StatusUnauthorized, http.StatusForbidden, http.StatusRequestTimeout, http.StatusTooManyRequests:
		return true
	}
	return status >= 500
}
