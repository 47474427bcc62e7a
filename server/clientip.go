package server

import (
	"fmt"
	"net/http"
	"net/netip"
	"strings"
)

// parsePrefixes parses addresses ("10.0.0.7") and CIDR ranges
// ("10.0.0.0/8") into prefixes.
func parsePrefixes(list []string) ([]netip.Prefix, error) {
	out := make([]netip.Prefix, 0, len(list))
	for _, v := range list {
		v = strings.TrimSpace(v)
		if p, err := netip.ParsePrefix(v); err == nil {
			out = append(out, p.Masked())
			continue
		}
		a, err := netip.ParseAddr(v)
		if err != nil {
			return nil, fmt.Errorf("%q is neither an address nor a CIDR range", v)
		}
		out = append(out, netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()))
	}
	return out, nil
}

// clientIPs attributes requests to client addresses.
type clientIPs struct{ trusted []netip.Prefix }

func (c clientIPs) isTrusted(host string) bool {
	a, err := netip.ParseAddr(host)
	if err != nil {
		return false
	}
	a = a.Unmap()
	for _, p := range c.trusted {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// of returns the address a request is attributed to: the peer, or, when
// the peer is a trusted proxy, the right-most untrusted X-Forwarded-For
// entry (entries to its left are the client's own claims).
func (c clientIPs) of(r *http.Request) string {
	host := remoteIP(r.RemoteAddr)
	if len(c.trusted) == 0 || !c.isTrusted(host) {
		return host
	}
	hops := strings.Split(strings.Join(r.Header.Values("X-Forwarded-For"), ","), ",")
	for i := len(hops) - 1; i >= 0; i-- {
		h := strings.TrimSpace(hops[i])
		if h == "" {
			continue
		}
		if !c.isTrusted(h) {
			if _, err := netip.ParseAddr(h); err != nil {
				return host // malformed: do not trust the chain
			}
			return h
		}
	}
	return host
}
