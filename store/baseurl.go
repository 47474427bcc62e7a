package store

import (
	"net"
	"net/netip"
	"net/url"
	"strings"
)

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

// checkBaseURL validates a service's base_url: http or https, a host, no
// user info, query or fragment, and (unless allowMD) not a link-local or
// metadata address. Loopback and private addresses are allowed. It
// returns the URL without a trailing slash.
func checkBaseURL(raw string, allowMD bool) (string, error) {
	raw = strings.TrimSpace(raw)
	if raw == "" {
		return "", invalidf("base_url is required")
	}
	if err := CheckText("base_url", raw, 2048, true); err != nil {
		return "", err
	}
	u, err := url.Parse(raw)
	if err != nil && !strings.Contains(raw, "://") && !strings.HasPrefix(raw, "/") {
		// host:port/path parses as a scheme "host" or not at all.
		return "", invalidf("base_url must be an http:// or https:// URL, not %q; did you mean %q?", raw, suggestScheme(raw)+raw)
	}
	if err != nil {
		return "", invalidf("base_url is not a valid URL")
	}
	switch {
	case u.Scheme != "http" && u.Scheme != "https":
		if !strings.Contains(raw, "://") && !strings.HasPrefix(raw, "/") {
			return "", invalidf("base_url must be an http:// or https:// URL, not %q; did you mean %q?", raw, suggestScheme(raw)+raw)
		}
		return "", invalidf("base_url must be an http:// or https:// URL, not %q", raw)
	case u.Opaque != "" || u.Host == "":
		return "", invalidf("base_url must name a host (http://host[:port][/path])")
	case u.User != nil:
		return "", invalidf("base_url must not contain user info; put credentials in keys")
	case u.RawQuery != "" || u.ForceQuery:
		return "", invalidf("base_url must not have a query; use auth_scheme query:<name> for a key parameter")
	case u.Fragment != "":
		return "", invalidf("base_url must not have a fragment")
	}
	host := strings.ToLower(strings.TrimSuffix(u.Hostname(), "."))
	if host == "" {
		return "", invalidf("base_url must name a host")
	}
	if p := u.Port(); p != "" {
		if n, err := netip.ParseAddrPort("0.0.0.0:" + p); err != nil || n.Port() == 0 {
			return "", invalidf("base_url has an invalid port %q", p)
		}
	}
	addr, isIP := parseHostAddr(host)
	if !isIP && looksNumeric(host) {
		// "2852039166" or "0xa9.0xfe.0xa9.0xfe": some resolvers read these
		// as addresses; accept only canonical dotted quads.
		return "", invalidf("base_url host %q is a non-canonical IP address", host)
	}
	if !isIP && !validHostname(host) {
		return "", invalidf("base_url host %q is not a valid host name", host)
	}
	if !allowMD {
		if metadataHosts[host] {
			return "", invalidf("base_url points at a cloud metadata endpoint (%s); not allowed", host)
		}
		if isIP {
			for _, p := range metadataAddrs {
				if p.Contains(addr) {
					return "", invalidf("base_url points at a link-local or metadata address (%s); not allowed", addr)
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
