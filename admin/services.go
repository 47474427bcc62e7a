package admin

import (
	"bytes"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"net/netip"
	"net/textproto"
	"net/url"
	"strings"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/internal/httpx"
	"github.com/keypool/keypool/meter"
	"github.com/keypool/keypool/store"
)

// serviceInput is the body of POST and PATCH /admin/services.
type serviceInput struct {
	Name        opt[string] `json:"name"`
	DisplayName opt[string] `json:"display_name"`
	Description opt[string] `json:"description"`
	// IsActive false switches the service off (default true).
	IsActive     opt[bool]              `json:"is_active"`
	BaseURL      opt[string]            `json:"base_url"`
	AuthScheme   opt[string]            `json:"auth_scheme"`
	RateLimitRPM opt[int]               `json:"rate_limit_rpm"`
	MaxInFlight  opt[int]               `json:"max_in_flight"`
	ProxyHeaders opt[map[string]string] `json:"proxy_headers"`
	Selector     opt[string]            `json:"selector"`
	ExternalName opt[string]            `json:"external_name"`
	// Prices is a JSON object of model → price (or {"models": {…}}), as
	// meter.ParsePrices reads.
	Prices opt[json.RawMessage] `json:"prices"`
	// LLMFamily is the metered wire format: openai, anthropic, gemini,
	// none, or empty for detection per request.
	LLMFamily opt[string] `json:"llm_family"`
	timeoutsInput
	limitsInput
	keyPolicyInput
}

// keyPolicyInput is how the service's pool judges its keys
// (store.KeyPolicy); 0 or null means the default.
type keyPolicyInput struct {
	RetryAfterCap      opt[int] `json:"retry_after_cap"`
	ConfirmRefusals    opt[int] `json:"confirm_refusals"`
	MinActiveKeys      opt[int] `json:"min_active_keys"`
	MaxEjectionPercent opt[int] `json:"max_ejection_percent"`
}

func (in *keyPolicyInput) apply(p *store.KeyPolicy) error {
	next := *p
	for _, f := range []struct {
		o   opt[int]
		dst *int
	}{
		{in.RetryAfterCap, &next.RetryAfterCap},
		{in.ConfirmRefusals, &next.ConfirmRefusals},
		{in.MinActiveKeys, &next.MinActiveKeys},
		{in.MaxEjectionPercent, &next.MaxEjectionPercent},
	} {
		if f.o.Set {
			*f.dst = f.o.V
		}
	}
	if err := next.Validate(); err != nil {
		return badRequest("%s", strings.TrimPrefix(err.Error(), store.ErrInvalid.Error()+": "))
	}
	*p = next
	return nil
}

// serviceView is a service as the API shows it: prices as a JSON object.
type serviceView struct {
	store.Service
	IsActive bool `json:"is_active"`
	timeoutsView
	Prices json.RawMessage `json:"prices,omitempty"`
}

func viewService(s store.Service) serviceView {
	v := serviceView{Service: s, IsActive: !s.Disabled, timeoutsView: viewTimeouts(s)}
	if s.Prices != "" && json.Valid([]byte(s.Prices)) {
		v.Prices = json.RawMessage(s.Prices)
	}
	return v
}

// apply validates the present fields and copies them into s.
func (in *serviceInput) apply(s *store.Service, allowMD bool) error {
	if in.DisplayName.Set {
		v := strings.TrimSpace(in.DisplayName.V)
		if err := checkText("display_name", v, 256, false); err != nil {
			return err
		}
		s.DisplayName = v
	}
	if err := setDescription(in.Description, &s.Description); err != nil {
		return err
	}
	if in.IsActive.Set {
		s.Disabled = !in.IsActive.Null && !in.IsActive.V
	}
	if in.BaseURL.Set {
		u, err := checkBaseURL(in.BaseURL.V, allowMD)
		if err != nil {
			return err
		}
		s.BaseURL = u
	}
	if in.AuthScheme.Set {
		sch, err := keypool.ParseAuthScheme(in.AuthScheme.V)
		if err != nil {
			return badRequest("%s", trimInvalid(err))
		}
		s.AuthScheme = sch.Name()
	}
	if in.Selector.Set {
		name := strings.ToLower(strings.TrimSpace(in.Selector.V))
		if _, err := keypool.ParseSelector(name); err != nil {
			return badRequest("selector: %s", trimInvalid(err))
		}
		s.Selector = name
	}
	if in.RateLimitRPM.Set {
		if in.RateLimitRPM.V < 0 {
			return badRequest("rate_limit_rpm must not be negative (0 means unlimited)")
		}
		s.RateLimitRPM = in.RateLimitRPM.V
	}
	if in.MaxInFlight.Set {
		if in.MaxInFlight.V < 0 {
			return badRequest("max_in_flight must not be negative (0 means unlimited)")
		}
		s.MaxInFlight = in.MaxInFlight.V
	}
	if in.ProxyHeaders.Set {
		h, err := checkProxyHeaders(in.ProxyHeaders.V)
		if err != nil {
			return err
		}
		s.ProxyHeaders = h
	}
	if in.ExternalName.Set {
		v := strings.TrimSpace(in.ExternalName.V)
		if err := checkText("external_name", v, 128, false); err != nil {
			return err
		}
		s.ExternalName = v
	}
	if in.LLMFamily.Set {
		v := strings.TrimSpace(in.LLMFamily.V)
		if v != "" {
			f, err := meter.ParseFamily(v)
			if err != nil {
				return badRequest("llm_family %q: want openai, anthropic, gemini, none, or empty to detect it", v)
			}
			v = f.String()
		}
		s.LLMFamily = v
	}
	if in.Prices.Set {
		p, err := checkPrices(in.Prices.V)
		if err != nil {
			return err
		}
		s.Prices = p
	}
	if err := in.keyPolicyInput.apply(&s.KeyPolicy); err != nil {
		return err
	}
	if err := in.timeoutsInput.apply(s); err != nil {
		return err
	}
	return in.limitsInput.apply(&s.Limits)
}

// trimInvalid drops the "keypool: invalid configuration: " prefix of a
// parse error; what is left names the value and the valid options.
func trimInvalid(err error) string {
	return strings.TrimPrefix(err.Error(), keypool.ErrInvalidConfig.Error()+": ")
}

// checkPrices validates a price table and returns it as compact JSON.
func checkPrices(raw json.RawMessage) (string, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || string(raw) == "null" {
		return "", nil
	}
	if raw[0] != '{' {
		return "", badRequest("prices must be a JSON object of model name to price")
	}
	if _, err := meter.ParsePrices(raw); err != nil {
		return "", badRequest("prices: %s", strings.TrimPrefix(err.Error(), "meter: prices: "))
	}
	var b bytes.Buffer
	if err := json.Compact(&b, raw); err != nil {
		return "", badRequest("prices: malformed JSON")
	}
	return b.String(), nil
}

// metadataHosts are cloud metadata endpoints by name.
var metadataHosts = map[string]bool{
	"metadata.google.internal":   true,
	"metadata.goog":              true,
	"metadata":                   true,
	"instance-data":              true,
	"instance-data.ec2.internal": true,
	"metadata.azure.internal":    true,
}

// metadataAddrs are cloud metadata endpoints by address, besides the
// link-local ranges.
var metadataAddrs = []netip.Prefix{
	netip.MustParsePrefix("169.254.0.0/16"),     // IPv4 link-local: AWS, GCP, Azure, OpenStack metadata
	netip.MustParsePrefix("fe80::/10"),          // IPv6 link-local
	netip.MustParsePrefix("100.100.100.200/32"), // Alibaba Cloud metadata
	netip.MustParsePrefix("fd00:ec2::254/128"),  // AWS IMDS over IPv6
}

// CheckBaseURL validates a service's base_url as POST /admin/services
// does (the YAML file's services go through it too), and returns it
// without a trailing slash; see [checkBaseURL].
func CheckBaseURL(raw string, allowMetadata bool) (string, error) {
	return checkBaseURL(raw, allowMetadata)
}

// checkBaseURL validates a service's base_url: http or https, a host, no
// user info, query or fragment, and (unless allowMD) not a link-local or
// metadata address. Loopback and private addresses are allowed. It
// returns the URL without a trailing slash.
func checkBaseURL(raw string, allowMD bool) (string, error) {
	raw = strings.TrimSpace(raw)
	if raw == "" {
		return "", badRequest("base_url is required")
	}
	if err := checkText("base_url", raw, 2048, true); err != nil {
		return "", err
	}
	u, err := url.Parse(raw)
	if err != nil && !strings.Contains(raw, "://") && !strings.HasPrefix(raw, "/") {
		// host:port/path parses as a scheme "host" or not at all.
		return "", badRequest("base_url must be an http:// or https:// URL, not %q; did you mean %q?", raw, suggestScheme(raw)+raw)
	}
	if err != nil {
		return "", badRequest("base_url is not a valid URL")
	}
	switch {
	case u.Scheme != "http" && u.Scheme != "https":
		if !strings.Contains(raw, "://") && !strings.HasPrefix(raw, "/") {
			return "", badRequest("base_url must be an http:// or https:// URL, not %q; did you mean %q?", raw, suggestScheme(raw)+raw)
		}
		return "", badRequest("base_url must be an http:// or https:// URL, not %q", raw)
	case u.Opaque != "" || u.Host == "":
		return "", badRequest("base_url must name a host (http://host[:port][/path])")
	case u.User != nil:
		return "", badRequest("base_url must not contain user info; put credentials in keys")
	case u.RawQuery != "" || u.ForceQuery:
		return "", badRequest("base_url must not have a query; use auth_scheme query:<name> for a key parameter")
	case u.Fragment != "":
		return "", badRequest("base_url must not have a fragment")
	}
	host := strings.ToLower(strings.TrimSuffix(u.Hostname(), "."))
	if host == "" {
		return "", badRequest("base_url must name a host")
	}
	if p := u.Port(); p != "" {
		if n, err := netip.ParseAddrPort("0.0.0.0:" + p); err != nil || n.Port() == 0 {
			return "", badRequest("base_url has an invalid port %q", p)
		}
	}
	addr, isIP := parseHostAddr(host)
	if !isIP && looksNumeric(host) {
		// "2852039166" or "0xa9.0xfe.0xa9.0xfe": some resolvers read these
		// as addresses; accept only canonical dotted quads.
		return "", badRequest("base_url host %q is a non-canonical IP address", host)
	}
	if !isIP && !validHostname(host) {
		return "", badRequest("base_url host %q is not a valid host name", host)
	}
	if !allowMD {
		if metadataHosts[host] {
			return "", badRequest("base_url points at a cloud metadata endpoint (%s); not allowed", host)
		}
		if isIP {
			for _, p := range metadataAddrs {
				if p.Contains(addr) {
					return "", badRequest("base_url points at a link-local or metadata address (%s); not allowed", addr)
				}
			}
		}
	}
	return strings.TrimRight(u.String(), "/"), nil
}

// parseHostAddr parses host as an IP address (zone dropped, IPv4-mapped
// IPv6 unmapped).
func parseHostAddr(host string) (netip.Addr, bool) {
	if i := strings.IndexByte(host, '%'); i >= 0 {
		host = host[:i]
	}
	a, err := netip.ParseAddr(host)
	if err != nil {
		return netip.Addr{}, false
	}
	return a.Unmap(), true
}

// looksNumeric reports whether the last label of host is numeric (decimal
// or 0x hex): no top-level domain is, so such a host is an address in
// disguise.
func looksNumeric(host string) bool {
	last := host[strings.LastIndexByte(host, '.')+1:]
	digits, isHex := last, false
	if len(last) > 2 && last[:2] == "0x" {
		digits, isHex = last[2:], true
	}
	if digits == "" {
		return false
	}
	for i := 0; i < len(digits); i++ {
		c := digits[i]
		if !('0' <= c && c <= '9' || isHex && 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// validHostname reports whether host is a plausible DNS name.
func validHostname(host string) bool {
	if len(host) > 253 {
		return false
	}
	for _, label := range strings.Split(host, ".") {
		if label == "" || len(label) > 63 {
			return false
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '_') {
				return false
			}
		}
	}
	return true
}

// hopByHop are headers that proxy_headers may not set: connection-level
// headers, and headers the proxy computes itself.
var hopByHop = map[string]bool{
	"Connection": true, "Keep-Alive": true, "Proxy-Authenticate": true, "Proxy-Authorization": true,
	"Proxy-Connection": true, "Te": true, "Trailer": true, "Transfer-Encoding": true, "Upgrade": true,
	"Host": true, "Content-Length": true,
}

// checkProxyHeaders validates proxy_headers and canonicalises their names.
func checkProxyHeaders(h map[string]string) (map[string]string, error) {
	if len(h) > 64 {
		return nil, badRequest("proxy_headers has %d entries; at most 64", len(h))
	}
	if len(h) == 0 {
		return nil, nil
	}
	out := make(map[string]string, len(h))
	for name, v := range h {
		if !validToken(name) {
			return nil, badRequest("proxy_headers: %q is not a valid header name", name)
		}
		c := textproto.CanonicalMIMEHeaderKey(name)
		if hopByHop[c] {
			return nil, badRequest("proxy_headers: %s is a hop-by-hop or computed header and cannot be set", c)
		}
		if _, dup := out[c]; dup {
			return nil, badRequest("proxy_headers: %s is given twice", c)
		}
		if len(v) > 4096 || strings.ContainsAny(v, "\r\n\x00") {
			return nil, badRequest("proxy_headers: the value of %s is not a valid header value", c)
		}
		out[c] = strings.TrimSpace(v)
	}
	return out, nil
}

// validToken reports whether v is a valid HTTP header name (RFC 9110
// token).
func validToken(v string) bool {
	if v == "" || len(v) > 256 {
		return false
	}
	for i := 0; i < len(v); i++ {
		c := v[i]
		if c <= ' ' || c >= 0x7f || strings.IndexByte("()<>@,;:\\\"/[]?={}", c) >= 0 {
			return false
		}
	}
	return true
}

func (a *API) createService(w http.ResponseWriter, r *http.Request) error {
	if err := checkQuery(r); err != nil {
		return err
	}
	var in serviceInput
	if err := decode(w, r, &in); err != nil {
		return err
	}
	name := strings.TrimSpace(in.Name.V)
	switch {
	case !in.Name.has() || name == "":
		return badRequest("name is required")
	case !isName(name):
		return badRequest("name %q is invalid: use 1-64 of a-z, 0-9, '.', '_', '-', starting with a letter or digit", name)
	case !in.BaseURL.has():
		return badRequest("base_url is required")
	}
	s := store.Service{Name: name, AuthScheme: "bearer", Selector: "round_robin"}
	if err := in.apply(&s, a.allowMD); err != nil {
		return err
	}
	if err := a.st.CreateService(r.Context(), &s); err != nil {
		if errors.Is(err, store.ErrConflict) {
			return conflict("service %q already exists", name)
		}
		return err
	}
	a.log.InfoContext(r.Context(), "admin: service created", "service", s.Name, "base_url", s.BaseURL)
	a.changed()
	httpx.WriteJSON(w, http.StatusCreated, viewService(s))
	return nil
}

func (a *API) listServices(w http.ResponseWriter, r *http.Request) error {
	if err := checkQuery(r); err != nil {
		return err
	}
	ss, err := a.st.Services(r.Context())
	if err != nil {
		return err
	}
	out := make([]serviceView, len(ss))
	for i := range ss {
		out[i] = viewService(ss[i])
	}
	httpx.WriteJSON(w, http.StatusOK, map[string]any{"services": out})
	return nil
}

func (a *API) getService(w http.ResponseWriter, r *http.Request) error {
	name := r.PathValue("name")
	s, err := a.st.GetService(r.Context(), name)
	if err != nil {
		return orNotFound(err, "service %q not found", name)
	}
	httpx.WriteJSON(w, http.StatusOK, viewService(s))
	return nil
}

func (a *API) patchService(w http.ResponseWriter, r *http.Request) error {
	name := r.PathValue("name")
	var in serviceInput
	if err := decode(w, r, &in); err != nil {
		return err
	}
	s, err := a.st.GetService(r.Context(), name)
	if err != nil {
		return orNotFound(err, "service %q not found", name)
	}
	if in.Name.Set && strings.TrimSpace(in.Name.V) != name {
		return badRequest("name cannot be changed; create a new service instead")
	}
	if in.BaseURL.Null {
		return badRequest("base_url cannot be removed")
	}
	if err := in.apply(&s, a.allowMD); err != nil {
		return err
	}
	if err := a.st.UpdateService(r.Context(), &s); err != nil {
		return orNotFound(err, "service %q not found", name)
	}
	a.log.InfoContext(r.Context(), "admin: service updated", "service", s.Name)
	a.changed()
	httpx.WriteJSON(w, http.StatusOK, viewService(s))
	return nil
}

func (a *API) deleteService(w http.ResponseWriter, r *http.Request) error {
	name := r.PathValue("name")
	if err := a.st.DeleteService(r.Context(), name); err != nil {
		return orNotFound(err, "service %q not found", name)
	}
	if a.pool != nil {
		a.pool.RemoveService(name)
	}
	a.log.InfoContext(r.Context(), "admin: service deleted", "service", name)
	a.changed()
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// suggestScheme is the scheme to suggest for a base_url written without
// one: http:// for a loopback host (localhost, 127.x, ::1), which serves
// plain HTTP as a rule, https:// for the others.
func suggestScheme(raw string) string {
	host := raw
	if i := strings.IndexAny(host, "/?#"); i >= 0 {
		host = host[:i]
	}
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	host = strings.Trim(host, "[]")
	if strings.EqualFold(host, "localhost") || strings.HasSuffix(strings.ToLower(host), ".localhost") {
		return "http://"
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
		return "http://"
	}
	return "https://"
}

// maxDescription bounds a description's length, in bytes.
const maxDescription = 2000

// setDescription validates a present description field and copies it
// into dst (null clears it).
func setDescription(in opt[string], dst *string) error {
	if !in.Set {
		return nil
	}
	v := strings.TrimSpace(in.V)
	if err := checkText("description", v, maxDescription, false); err != nil {
		return err
	}
	*dst = v
	return nil
}
