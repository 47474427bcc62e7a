// Package console is keypoold's web console: server-rendered pages
// (html/template, embedded with go:embed, a little plain JavaScript and
// CSS, no build step) over the admin API.
//
// Every change the console makes goes through the admin API's own
// handlers, called in process as the signed-in user ([admin.WithIdentity]),
// so the console shares the API's validation, error messages, role checks
// and audit records; it never writes to the store itself.
//
// # Security
//
//   - Sign-in opens the same server-side session as POST
//     /admin/auth/login; its token travels in a cookie that is HttpOnly,
//     SameSite=Strict, Path=/, and Secure when [Config.Secure] says so.
//   - Every state-changing request passes net/http's
//     CrossOriginProtection (Sec-Fetch-Site / Origin checks), so a
//     cross-site form post is refused with 403.
//   - Pages carry a strict Content-Security-Policy (scripts and styles
//     from the console's own files only, no inline script),
//     X-Frame-Options: DENY, nosniff, no-referrer and Cache-Control:
//     no-store.
//   - html/template escapes every value; no secret is ever rendered except
//     a new client token, once, on the page that created it.
//   - A viewer's changes are refused by the admin API (403), whatever the
//     page shows.
package console

import (
	"bytes"
	"cmp"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/keypool/keypool/admin"
	"github.com/keypool/keypool/auth"
	"github.com/keypool/keypool/internal/pages"
	"github.com/keypool/keypool/store"
)

//go:embed templates/*.html
var templateFS embed.FS

//go:embed static
var staticFS embed.FS

// Prefix is where the console is mounted.
const Prefix = "/console/"

// CookieName is the session cookie's name.
const CookieName = "keypool_session"

// Config configures a [Handler].
type Config struct {
	// API is the admin API the console acts through. Required, with
	// sessions enabled.
	API *admin.API
	// Sessions checks session cookies. Required.
	Sessions *auth.Sessions
	// Statuses, if set, gives the overview its 429 and error counts.
	Statuses store.StatusCounter
	// Secure reports whether the session cookie set in answer to r must
	// be marked Secure. If nil, when r came over TLS.
	Secure func(r *http.Request) bool
	// Logger receives internal errors. If nil, slog.Default().
	Logger *slog.Logger
	// Now returns the current time. If nil, time.Now.
	Now func() time.Time
	// SSOLogin shows "Sign in with <SSOProvider>" (to
	// /auth/login?as=admin) beside the password form.
	SSOLogin bool
	// SSOProvider names the sign-in provider on that button. If empty,
	// "SSO".
	SSOProvider string
}

// Handler serves the console under [Prefix]. Create it with [New]; it is
// safe for concurrent use.
type Handler struct {
	api      *admin.API
	sessions *auth.Sessions
	statuses store.StatusCounter
	secure   func(*http.Request) bool
	log      *slog.Logger
	now      func() time.Time
	ssoLogin string // the provider's name on the SSO button; "" for none
	pages    map[string]*template.Template
	handler  http.Handler
}

// New returns a Handler.
func New(cfg Config) (*Handler, error) {
	if cfg.API == nil || cfg.Sessions == nil {
		return nil, errors.New("console: Config.API and Config.Sessions are required")
	}
	h := &Handler{api: cfg.API, sessions: cfg.Sessions, statuses: cfg.Statuses, secure: cfg.Secure, log: cfg.Logger, now: cfg.Now}
	if cfg.SSOLogin {
		h.ssoLogin = cmp.Or(cfg.SSOProvider, "SSO")
	}
	if h.secure == nil {
		h.secure = func(r *http.Request) bool { return r.TLS != nil }
	}
	if h.log == nil {
		h.log = slog.Default()
	}
	if h.now == nil {
		h.now = time.Now
	}
	var err error
	if h.pages, err = parsePages(); err != nil {
		return nil, err
	}
	h.handler = h.routes()
	return h, nil
}

func parsePages() (map[string]*template.Template, error) {
	return pages.Parse(templateFS, funcs, "console")
}

// ServeHTTP serves a console request.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	hd := w.Header()
	hd.Set("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "+
		"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
	hd.Set("X-Frame-Options", "DENY")
	hd.Set("X-Content-Type-Options", "nosniff")
	hd.Set("Referrer-Policy", "no-referrer")
	h.handler.ServeHTTP(w, r)
}

// handlerFunc is a console page handler with its identity.
type handlerFunc func(w http.ResponseWriter, r *http.Request, id auth.Identity)

func (h *Handler) routes() http.Handler {
	mux := http.NewServeMux()
	static, _ := fs.Sub(staticFS, "static")
	fileServer := http.StripPrefix(Prefix+"static/", http.FileServerFS(static))
	mux.Handle("GET "+Prefix+"static/", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "public, max-age=3600")
		fileServer.ServeHTTP(w, r)
	}))
	mux.HandleFunc("GET "+Prefix+"login", h.loginPage)
	mux.HandleFunc("POST "+Prefix+"login", h.loginSubmit)
	page := func(pattern string, fn handlerFunc) { mux.Handle(pattern, h.authed(fn)) }
	page("POST "+Prefix+"logout", h.logout)
	page("GET "+Prefix+"{$}", h.overview)
	page("GET "+Prefix+"live/overview", h.overviewLive)
	page("GET "+Prefix+"services", h.services)
	page("GET "+Prefix+"services/new", h.serviceNew)
	page("POST "+Prefix+"services", h.serviceCreate)
	page("GET "+Prefix+"services/{name}", h.serviceDetail)
	page("GET "+Prefix+"live/services/{name}", h.serviceKeysLive)
	page("GET "+Prefix+"services/{name}/edit", h.serviceEdit)
	page("POST "+Prefix+"services/{name}/edit", h.serviceUpdate)
	page("POST "+Prefix+"services/{name}/delete", h.serviceDelete)
	page("POST "+Prefix+"services/{name}/keys", h.keyCreate)
	page("POST "+Prefix+"services/{name}/import", h.keyImport)
	page("POST "+Prefix+"keys/{id}/status", h.keyStatus)
	page("POST "+Prefix+"keys/{id}/delete", h.keyDelete)
	page("POST "+Prefix+"keys/{id}/tier", h.keyTier)
	page("GET "+Prefix+"tiers", h.tiers)
	page("POST "+Prefix+"tiers", h.tierCreate)
	page("GET "+Prefix+"tiers/{name}", h.tierDetail)
	page("POST "+Prefix+"tiers/{name}/edit", h.tierUpdate)
	page("POST "+Prefix+"tiers/{name}/delete", h.tierDelete)
	page("GET "+Prefix+"teams", h.teams)
	page("POST "+Prefix+"teams", h.teamCreate)
	page("GET "+Prefix+"teams/{id}", h.teamDetail)
	page("POST "+Prefix+"teams/{id}/edit", h.teamUpdate)
	page("POST "+Prefix+"teams/{id}/delete", h.teamDelete)
	page("POST "+Prefix+"teams/{id}/users", h.userCreate)
	page("POST "+Prefix+"users/{id}/delete", h.userDelete)
	page("POST "+Prefix+"teams/{id}/tokens", h.tokenCreate)
	page("POST "+Prefix+"tokens/{id}/revoke", h.tokenRevoke)
	page("GET "+Prefix+"usage", h.usage)
	page("GET "+Prefix+"usage.csv", h.usageCSV)
	page("GET "+Prefix+"audit", h.audit)
	page("GET "+Prefix+"admin-users", h.adminUsers)
	page("POST "+Prefix+"admin-users", h.adminUserCreate)
	page("POST "+Prefix+"admin-users/{id}", h.adminUserUpdate)
	mux.HandleFunc(Prefix, func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "not found", http.StatusNotFound)
	})
	cop := http.NewCrossOriginProtection()
	cop.SetDenyHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "cross-origin request refused", http.StatusForbidden)
	}))
	return cop.Handler(mux)
}

// authed checks the session cookie; without a valid one, a page request
// is sent to the sign-in page.
func (h *Handler) authed(fn handlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "no-store")
		c, err := r.Cookie(CookieName)
		var id auth.Identity
		if err == nil {
			id, err = h.sessions.Lookup(r.Context(), c.Value)
		}
		if err != nil {
			if c != nil {
				h.clearCookie(w, r)
			}
			if strings.HasPrefix(r.URL.Path, Prefix+"live/") {
				w.WriteHeader(http.StatusUnauthorized)
				return
			}
			next := ""
			if r.Method == http.MethodGet {
				next = "?next=" + url.QueryEscape(r.URL.RequestURI())
			}
			http.Redirect(w, r, Prefix+"login"+next, http.StatusSeeOther)
			return
		}
		fn(w, r, id)
	})
}

// SetSessionCookie sets the console's session cookie to an admin session
// token opened elsewhere (single sign-on).
func (h *Handler) SetSessionCookie(w http.ResponseWriter, r *http.Request, token string, expires time.Time) {
	h.setCookie(w, r, token, expires)
}

func (h *Handler) setCookie(w http.ResponseWriter, r *http.Request, token string, expires time.Time) {
	http.SetCookie(w, &http.Cookie{Name: CookieName, Value: token, Path: "/", Expires: expires,
		HttpOnly: true, Secure: h.secure(r), SameSite: http.SameSiteStrictMode})
}

func (h *Handler) clearCookie(w http.ResponseWriter, r *http.Request) {
	http.SetCookie(w, &http.Cookie{Name: CookieName, Value: "", Path: "/", MaxAge: -1,
		HttpOnly: true, Secure: h.secure(r), SameSite: http.SameSiteStrictMode})
}

// view is what every page template gets.
type view struct {
	Title string
	Nav   string
	User  auth.Identity
	Flash string
	Error string
	// Lines are per-line errors of a bulk import.
	Lines []lineError
	Data  any
}

type lineError struct {
	Line    int    `json:"line"`
	Message string `json:"message"`
}

// render writes a page.
func (h *Handler) render(w http.ResponseWriter, status int, name string, v view) {
	t, ok := h.pages[name]
	if !ok {
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	var buf bytes.Buffer
	if err := t.ExecuteTemplate(&buf, "layout", v); err != nil {
		h.log.Error("console: render", "page", name, "err", err.Error())
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(status)
	_, _ = buf.WriteTo(w)
}

// renderFragment writes one named template of a page, for live refresh.
func (h *Handler) renderFragment(w http.ResponseWriter, page, name string, v view) {
	var buf bytes.Buffer
	if err := h.pages[page].ExecuteTemplate(&buf, name, v); err != nil {
		h.log.Error("console: render fragment", "page", page, "err", err.Error())
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	_, _ = buf.WriteTo(w)
}

// apiResult is the answer of an in-process admin API call.
type apiResult struct {
	Status int
	Body   []byte
	Header http.Header
}

// ok reports whether the call succeeded.
func (res apiResult) ok() bool { return res.Status < 400 }

// errMessage returns the API's error message.
func (res apiResult) errMessage() string {
	var b struct {
		Error struct {
			Message string `json:"message"`
		} `json:"error"`
	}
	if json.Unmarshal(res.Body, &b) == nil && b.Error.Message != "" {
		return b.Error.Message
	}
	return fmt.Sprintf("the request failed (%d)", res.Status)
}

// lineErrors returns the per-line errors of a failed import.
func (res apiResult) lineErrors() []lineError {
	var b struct {
		Lines []lineError `json:"lines"`
	}
	_ = json.Unmarshal(res.Body, &b)
	return b.Lines
}

func (res apiResult) decode(v any) error { return json.Unmarshal(res.Body, v) }

// recorder is a minimal http.ResponseWriter that keeps the answer.
type recorder struct {
	header http.Header
	status int
	body   bytes.Buffer
}

func (rec *recorder) Header() http.Header { return rec.header }
func (rec *recorder) WriteHeader(code int) {
	if rec.status == 0 {
		rec.status = code
	}
}
func (rec *recorder) Write(b []byte) (int, error) {
	if rec.status == 0 {
		rec.status = http.StatusOK
	}
	return rec.body.Write(b)
}

// call serves one admin API request in process, as id, attributed to the
// address of r. body is marshalled to JSON unless it is a string, which is
// sent as text/plain.
func (h *Handler) call(r *http.Request, id auth.Identity, method, path string, body any) apiResult {
	var rd io.Reader
	ctype := ""
	switch b := body.(type) {
	case nil:
	case string:
		rd, ctype = strings.NewReader(b), "text/plain"
	default:
		j, err := json.Marshal(b)
		if err != nil {
			return apiResult{Status: http.StatusInternalServerError}
		}
		rd, ctype = bytes.NewReader(j), "application/json"
	}
	req, err := http.NewRequestWithContext(admin.WithIdentity(r.Context(), id), method, path, rd)
	if err != nil {
		return apiResult{Status: http.StatusBadRequest, Body: []byte(`{"error":{"message":"bad request"}}`)}
	}
	req.RemoteAddr = r.RemoteAddr
	if v := r.Header.Values("X-Forwarded-For"); len(v) > 0 {
		req.Header["X-Forwarded-For"] = v
	}
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	rec := &recorder{header: http.Header{}}
	h.api.ServeHTTP(rec, req)
	if rec.status == 0 {
		rec.status = http.StatusOK
	}
	return apiResult{Status: rec.status, Body: rec.body.Bytes(), Header: rec.header}
}

// get calls a read endpoint and decodes its answer into v; it reports a
// failure as an error message.
func (h *Handler) get(r *http.Request, id auth.Identity, path string, v any) error {
	res := h.call(r, id, http.MethodGet, path, nil)
	if !res.ok() {
		return errors.New(res.errMessage())
	}
	return res.decode(v)
}

// redirect sends the browser to path after a successful change, with a
// message for the next page.
func redirect(w http.ResponseWriter, r *http.Request, path, flash string) {
	if flash != "" {
		sep := "?"
		if strings.Contains(path, "?") {
			sep = "&"
		}
		path += sep + "flash=" + url.QueryEscape(flash)
	}
	http.Redirect(w, r, path, http.StatusSeeOther)
}

// flash returns the message a redirect carried.
func flash(r *http.Request) string {
	f := r.URL.Query().Get("flash")
	if len(f) > 200 {
		f = f[:200]
	}
	return f
}

var _ http.Handler = (*Handler)(nil)
