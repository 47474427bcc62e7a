package admin

import (
	"bufio"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/keypool/keypool/auth"
	"github.com/keypool/keypool/internal/httpx"
	"github.com/keypool/keypool/store"
)

type identityKey struct{}

// WithIdentity returns a context that makes the [API] serve a request as
// id without looking at its Authorization header: the console, which
// authenticates its own session cookie, calls the API this way so that
// both share one set of handlers, validation and audit records.
func WithIdentity(ctx context.Context, id auth.Identity) context.Context {
	return context.WithValue(ctx, identityKey{}, id)
}

// IdentityFrom returns the identity a request is served as.
func IdentityFrom(ctx context.Context) (auth.Identity, bool) {
	id, ok := ctx.Value(identityKey{}).(auth.Identity)
	return id, ok
}

// auditAction names the action of a route pattern ("POST
// /admin/services" → "service.create"), or "" for a read.
func auditAction(pattern string) string {
	method, path, _ := strings.Cut(pattern, " ")
	if path == "/admin/auth/login" {
		return "" // Login records its own entries, failures included
	}
	var verb string
	switch method {
	case http.MethodPost:
		verb = "create"
	case http.MethodPatch:
		verb = "update"
	case http.MethodDelete:
		verb = "delete"
	default:
		return ""
	}
	segs := strings.Split(strings.TrimPrefix(path, "/admin/"), "/")
	res := strings.TrimSuffix(strings.ReplaceAll(segs[0], "-", "_"), "s")
	switch {
	case res == "auth" && len(segs) > 1:
		return "auth." + segs[1]
	case len(segs) > 1 && !strings.HasPrefix(segs[1], "{"):
		return res + "." + segs[1]
	}
	return res + "." + verb
}

// auditWriter remembers the status of a response and, for a creation,
// the start of its body, so that the audit record can name the created
// record's id. The body is only parsed for "id" and "name"; nothing else
// (a new token's value, say) is kept.
type auditWriter struct {
	http.ResponseWriter
	status int
	body   []byte
}

func (w *auditWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *auditWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	if w.status == http.StatusCreated && len(w.body) < 64<<10 {
		w.body = append(w.body, b[:min(len(b), 64<<10-len(w.body))]...)
	}
	return w.ResponseWriter.Write(b)
}

// Unwrap returns the wrapped writer, for http.ResponseController.
func (w *auditWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// Hijack is not supported through the audit writer.
func (w *auditWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	return nil, nil, http.ErrNotSupported
}

// record appends one audit entry for request r; a failure to write it is
// logged, never answered.
func (a *API) record(r *http.Request, action string, rec *auditWriter) {
	id, _ := IdentityFrom(r.Context())
	target := r.PathValue("id")
	if target == "" {
		target = r.PathValue("name")
	}
	if target == "" && len(rec.body) > 0 {
		var created struct {
			ID   string `json:"id"`
			Name string `json:"name"`
		}
		if json.Unmarshal(rec.body, &created) == nil {
			target = created.ID
			if target == "" {
				target = created.Name
			}
		}
	}
	if target == "" {
		target = r.URL.Query().Get("service")
	}
	status := rec.status
	if status == 0 {
		status = http.StatusOK
	}
	a.appendAudit(r, store.AuditEntry{Actor: id.Actor(), Action: action, Target: target, Status: status})
}

func (a *API) appendAudit(r *http.Request, e store.AuditEntry) {
	if a.audit == nil {
		return
	}
	e.Time = a.now().UTC()
	e.Addr = a.clientIP(r)
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), 5*time.Second)
	defer cancel()
	if err := a.audit.AppendAudit(ctx, &e); err != nil {
		a.log.ErrorContext(r.Context(), "admin: writing the audit log failed", "action", e.Action, "target", e.Target, "err", err.Error())
	}
}

// MaxAuditLimit is the most entries one GET /admin/audit returns.
const MaxAuditLimit = 1000

func (a *API) listAudit(w http.ResponseWriter, r *http.Request) error {
	if err := checkQuery(r, "actor", "action", "target", "since", "until", "limit"); err != nil {
		return err
	}
	qv := r.URL.Query()
	q := store.AuditQuery{Actor: qv.Get("actor"), Action: qv.Get("action"), Target: qv.Get("target"), Limit: 100}
	var err error
	if q.Since, err = parseTime("since", qv.Get("since"), false); err != nil {
		return err
	}
	if q.Until, err = parseTime("until", qv.Get("until"), true); err != nil {
		return err
	}
	if l := qv.Get("limit"); l != "" {
		n, err := strconv.Atoi(l)
		if err != nil || n < 1 || n > MaxAuditLimit {
			return badRequest("limit must be a whole number from 1 to %d", MaxAuditLimit)
		}
		q.Limit = n
	}
	entries, err := a.audit.ListAudit(r.Context(), q)
	if err != nil {
		return err
	}
	httpx.WriteJSON(w, http.StatusOK, map[string]any{"entries": entries})
	return nil
}
