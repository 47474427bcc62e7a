package server

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"syscall"
	"time"
)

// DefaultUpstream returns the transport keypoold uses to reach upstreams
// when [Config.Upstream] is nil: http.DefaultTransport's settings with
// room for many idle connections per upstream host. It refuses to connect
// to link-local and cloud metadata addresses (169.254.0.0/16, fe80::/10,
// 100.100.100.200, fd00:ec2::254) whatever name resolved to them, so a
// service's base_url cannot reach instance credentials through DNS; set
// [Config.AllowMetadataUpstreams] to allow them.
func DefaultUpstream() *http.Transport { return upstreamTransport(false) }

func upstreamTransport(allowMetadata bool) *http.Transport {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.MaxIdleConns = 4096
	t.MaxIdleConnsPerHost = 1024
	t.IdleConnTimeout = 90 * time.Second
	d := &net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}
	if !allowMetadata {
		d.Control = refuseMetadata
	}
	t.DialContext = d.DialContext
	return t
}

// errMetadataAddress is the dial error for a refused address.
var errMetadataAddress = errors.New("refusing to connect to a link-local or cloud metadata address")

var metadataAddrs = []netip.Addr{netip.MustParseAddr("100.100.100.200"), netip.MustParseAddr("fd00:ec2::254")}

// refuseMetadata is a net.Dialer Control hook: it runs after name
// resolution and before the connection is made.
func refuseMetadata(_, address string, _ syscall.RawConn) error {
	host, _, err := net.SplitHostPort(address)
	if err != nil {
		return err
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return err
	}
	ip = ip.Unmap()
	if ip.IsLinkLocalUnicast() || ip.IsLinkLocalMulticast() || slices.Contains(metadataAddrs, ip) {
		return fmt.Errorf("%w (%s)", errMetadataAddress, ip)
	}
	return nil
}
