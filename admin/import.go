package admin

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"sort"
	"strconv"
	"strings"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/internal/httpx"
	"github.com/keypool/keypool/store"
)

// lineError is one rejected line (or array element) of an import. It never
// holds the key value.
type lineError struct {
	// Line is the 1-based line number (text) or element number (JSON).
	Line    int    `json:"line"`
	Code    string `json:"code"`
	Message string `json:"message"`
}

// importError is the body of a failed import: the usual error shape plus
// every rejected line.
type importError struct {
	Error struct {
		Message string `json:"message"`
		Type    string `json:"type"`
		Code    string `json:"code"`
	} `json:"error"`
	Lines []lineError `json:"lines"`
}

// importResult is the body of a successful import.
type importResult struct {
	Created int       `json:"created"`
	Keys    []keyView `json:"keys"`
	// Rejected are the lines a partial import left out.
	Rejected []lineError `json:"rejected,omitempty"`
}

// importKeys handles POST /admin/keys/import: a JSON array of key objects
// (as POST /admin/keys takes; "service" may come from the query instead) or
// text/plain with one key value per line (blank lines and lines starting
// with '#' skipped), ?service= and optionally ?tier=. All or nothing: if
// any line is bad (an unknown service or tier, a duplicate, an invalid
// value), nothing is written and the answer lists every bad line, 400 when
// any is invalid, 409 when the only problems are duplicates (within the
// batch or already stored). With ?partial=true the good lines are written
// and the bad ones listed as "rejected" in the 201 answer (or, when no
// line is good, the error as above).
func (a *API) importKeys(w http.ResponseWriter, r *http.Request) error {
	if err := checkQuery(r, "service", "tier", "partial"); err != nil {
		return err
	}
	q := r.URL.Query()
	defService := strings.TrimSpace(q.Get("service"))
	defTier := strings.TrimSpace(q.Get("tier"))
	partial := false
	if v := q.Get("partial"); v != "" {
		var err error
		if partial, err = strconv.ParseBool(v); err != nil {
			return badRequest("partial must be true or false, not %q", v)
		}
	}
	mt := "application/json"
	if ct := r.Header.Get("Content-Type"); ct != "" {
		var err error
		if mt, _, err = mime.ParseMediaType(ct); err != nil {
			return badRequest("Content-Type %q is not valid", ct)
		}
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, MaxImportBody))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return httpx.Errorf(http.StatusRequestEntityTooLarge, httpx.CodeRequestTooLarge,
				"import body is larger than %d bytes", MaxImportBody)
		}
		return badRequest("could not read the request body")
	}
	var (
		keys  []*store.Key
		lines []int
		bad   []lineError
	)
	switch mt {
	case "text/plain":
		if defService == "" {
			return badRequest("service query parameter is required for a text/plain import")
		}
		keys, lines, bad, err = parseTextImport(body, defService, defTier)
	case "application/json":
		if defTier != "" {
			return badRequest("tier query parameter is for text/plain imports; give each JSON element its \"tier\"")
		}
		keys, lines, bad, err = parseJSONImport(body, defService)
	default:
		return badRequest("Content-Type must be application/json (an array of keys) or text/plain (one key per line), not %q", mt)
	}
	if err != nil {
		return err
	}
	if len(keys)+len(bad) == 0 {
		return badRequest("the import holds no keys")
	}
	if len(keys)+len(bad) > MaxImportKeys {
		return badRequest("the import holds %d keys; at most %d per call", len(keys)+len(bad), MaxImportKeys)
	}
	moreBad, err := a.checkImport(r, keys, lines)
	if err != nil {
		return err
	}
	bad = append(bad, moreBad...)
	sort.SliceStable(bad, func(i, j int) bool { return bad[i].Line < bad[j].Line })
	if len(moreBad) > 0 && partial {
		keys = withoutLines(keys, lines, moreBad)
	}
	if len(bad) > 0 && (!partial || len(keys) == 0) {
		writeImportError(w, bad)
		return nil
	}
	if err := a.st.CreateKeys(r.Context(), keys); err != nil {
		switch {
		case errors.Is(err, store.ErrConflict):
			// A key added concurrently: nothing was written.
			return conflict("a key in the import was added by another request meanwhile; nothing was imported, retry")
		case errors.Is(err, store.ErrInvalid):
			return badRequest("a tier named in the import does not exist, or a service named in it was deleted meanwhile; nothing was imported")
		}
		return err
	}
	res := importResult{Created: len(keys), Keys: make([]keyView, len(keys)), Rejected: bad}
	services := map[string]bool{}
	for i, k := range keys {
		res.Keys[i] = viewKey(k, nil)
		services[k.Service] = true
		k.Secret = ""
	}
	a.log.InfoContext(r.Context(), "admin: keys imported", "count", len(keys), "services", len(services), "rejected", len(bad))
	a.changed()
	httpx.WriteJSON(w, http.StatusCreated, res)
	return nil
}

func writeImportError(w http.ResponseWriter, bad []lineError) {
	status, code := http.StatusConflict, httpx.CodeConflict
	for _, b := range bad {
		if b.Code != httpx.CodeConflict {
			status, code = http.StatusBadRequest, httpx.CodeBadRequest
			break
		}
	}
	var body importError
	body.Error.Code = code
	body.Error.Type = "invalid_request_error"
	body.Error.Message = rejectedText(len(bad))
	body.Lines = bad
	w.Header().Set("X-Content-Type-Options", "nosniff")
	httpx.WriteJSON(w, status, body)
}

// withoutLines returns the keys whose line is not one of bad's; lines
// are the keys' line numbers.
func withoutLines(keys []*store.Key, lines []int, bad []lineError) []*store.Key {
	skip := make(map[int]bool, len(bad))
	for _, b := range bad {
		skip[b.Line] = true
	}
	var out []*store.Key
	for i, k := range keys {
		if !skip[lines[i]] {
			out = append(out, k)
		}
	}
	return out
}

// parseTextImport reads one key value per line; every key joins tier (if
// not empty).
func parseTextImport(body []byte, service, tier string) (keys []*store.Key, lines []int, bad []lineError, err error) {
	sc := bufio.NewScanner(bytes.NewReader(body))
	sc.Buffer(make([]byte, 64<<10), MaxImportBody)
	n := 0
	for sc.Scan() {
		n++
		v := strings.TrimSpace(sc.Text())
		if v == "" || strings.HasPrefix(v, "#") {
			continue
		}
		k := &store.Key{Service: service, Status: store.StatusActive}
		in := keyInput{KeyValue: opt[keypool.Secret]{Set: true, V: keypool.Secret(v)}}
		if tier != "" {
			in.Tier = opt[string]{Set: true, V: tier}
		}
		if e := in.apply(k); e != nil {
			bad = append(bad, lineError{Line: n, Code: httpx.CodeBadRequest, Message: errMessage(e)})
			continue
		}
		keys, lines = append(keys, k), append(lines, n)
	}
	if err := sc.Err(); err != nil {
		return nil, nil, nil, badRequest("could not read the import: %s", "line too long or unreadable")
	}
	return keys, lines, bad, nil
}

// parseJSONImport reads a JSON array of key objects, decoding each one
// strictly on its own so that a bad element is reported by number.
func parseJSONImport(body []byte, defService string) (keys []*store.Key, lines []int, bad []lineError, err error) {
	var raw []json.RawMessage
	if err := json.Unmarshal(body, &raw); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			return nil, nil, nil, badRequest("a JSON import must be an array of key objects")
		}
		return nil, nil, nil, badRequest("malformed JSON in the import")
	}
	for i, el := range raw {
		n := i + 1
		var in keyInput
		dec := json.NewDecoder(bytes.NewReader(el))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&in); err != nil {
			bad = append(bad, lineError{Line: n, Code: httpx.CodeBadRequest, Message: jsonElementError(err)})
			continue
		}
		if name := httpx.DuplicateField(el); name != "" {
			bad = append(bad, lineError{Line: n, Code: httpx.CodeBadRequest, Message: fmt.Sprintf("field %q appears more than once", name)})
			continue
		}
		if in.Status.Set {
			bad = append(bad, lineError{Line: n, Code: httpx.CodeBadRequest, Message: "status cannot be set on import; imported keys are active"})
			continue
		}
		service := defService
		if in.Service.has() {
			service = strings.TrimSpace(in.Service.V)
		}
		if service == "" {
			bad = append(bad, lineError{Line: n, Code: httpx.CodeBadRequest, Message: "service is required (in the element or as ?service=)"})
			continue
		}
		if !in.KeyValue.has() && !in.Key.has() {
			bad = append(bad, lineError{Line: n, Code: httpx.CodeBadRequest, Message: "key_value is required"})
			continue
		}
		k := &store.Key{Service: service, Status: store.StatusActive}
		if e := in.apply(k); e != nil {
			bad = append(bad, lineError{Line: n, Code: httpx.CodeBadRequest, Message: errMessage(e)})
			continue
		}
		keys, lines = append(keys, k), append(lines, n)
	}
	return keys, lines, bad, nil
}

// jsonElementError describes a decoding error of one element without
// echoing any of its content.
func jsonElementError(err error) string {
	var te *json.UnmarshalTypeError
	var se *json.SyntaxError
	switch {
	case errors.As(err, &te):
		if te.Field != "" {
			return fmt.Sprintf("field %q has the wrong type (%s)", te.Field, te.Value)
		}
		return "each element must be a JSON object"
	case errors.As(err, &se):
		return "malformed JSON"
	case strings.HasPrefix(err.Error(), "json: unknown field "):
		return "unknown field " + strings.TrimPrefix(err.Error(), "json: unknown field ")
	}
	return "malformed JSON"
}

func errMessage(err error) string {
	var he *httpx.Error
	if errors.As(err, &he) {
		return he.Message
	}
	return "invalid"
}

// checkImport finds what only the store knows: unknown services and
// tiers, and values already stored or repeated within the batch.
func (a *API) checkImport(r *http.Request, keys []*store.Key, lines []int) ([]lineError, error) {
	var bad []lineError
	type svcInfo struct {
		exists bool
		values map[string]bool // stored values
	}
	services := map[string]*svcInfo{}
	tiers := map[string]error{} // tier → its checkTier answer
	seen := map[string]int{}    // service + "\x00" + value → first line
	for i, k := range keys {
		if k.Tier != "" {
			terr, ok := tiers[k.Tier]
			if !ok {
				terr = a.checkTier(r, k.Tier)
				var he *httpx.Error
				if terr != nil && !errors.As(terr, &he) {
					return nil, terr // the store failed
				}
				tiers[k.Tier] = terr
			}
			if terr != nil {
				bad = append(bad, lineError{Line: lines[i], Code: httpx.CodeBadRequest, Message: errMessage(terr)})
				continue
			}
		}
		info, ok := services[k.Service]
		if !ok {
			info = &svcInfo{}
			services[k.Service] = info
			if _, err := a.st.GetService(r.Context(), k.Service); err == nil {
				info.exists = true
				stored, err := a.st.Keys(r.Context(), k.Service)
				if err != nil {
					return nil, err
				}
				info.values = make(map[string]bool, len(stored))
				for _, s := range stored {
					info.values[s.Secret.Reveal()] = true
				}
			} else if !errors.Is(err, store.ErrNotFound) {
				return nil, err
			}
		}
		if !info.exists {
			bad = append(bad, lineError{Line: lines[i], Code: httpx.CodeBadRequest, Message: fmt.Sprintf("service %q does not exist", k.Service)})
			continue
		}
		v := k.Secret.Reveal()
		if info.values[v] {
			bad = append(bad, lineError{Line: lines[i], Code: httpx.CodeConflict, Message: fmt.Sprintf("this key is already in service %q", k.Service)})
			continue
		}
		id := k.Service + "\x00" + v
		if first, dup := seen[id]; dup {
			bad = append(bad, lineError{Line: lines[i], Code: httpx.CodeConflict, Message: fmt.Sprintf("duplicate of line %d", first)})
			continue
		}
		seen[id] = lines[i]
	}
	return bad, nil
}

// rejectedText says how many of an import's lines were rejected, in
// singular or plural.
func rejectedText(n int) string {
	if n == 1 {
		return "1 of the import's lines was rejected; nothing was imported"
	}
	return fmt.Sprintf("%d of the import's lines were rejected; nothing was imported", n)
}
