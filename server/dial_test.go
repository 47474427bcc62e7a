package server

import (
	"context"
	"errors"
	"net/http"
	"testing"
	"time"
)

func TestRefuseMetadata(t *testing.T) {
	tests := []struct {
		addr string
		ok   bool
	}{
		{"169.254.169.254:80", false},
		{"[fe80::1]:443", false},
		{"100.100.100.200:80", false},
		{"[fd00:ec2::254]:80", false},
		{"[::ffff:169.254.169.254]:80", false},
		{"127.0.0.1:8080", true},
		{"10.0.0.5:11434", true},
		{"[::1]:80", true},
		{"93.184.216.34:443", true},
	}
	for _, tt := range tests {
		t.Run(tt.addr, func(t *testing.T) {
			err := refuseMetadata("tcp", tt.addr, nil)
			if (err == nil) != tt.ok {
				t.Fatalf("refuseMetadata(%s) = %v, want ok=%v", tt.addr, err, tt.ok)
			}
		})
	}
}

// The default upstream transport refuses a metadata address before any
// packet is sent (the dialer's Control hook runs before connect).
func TestDefaultUpstreamRefusesMetadata(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://169.254.169.254/latest/meta-data/", nil)
	_, err := DefaultUpstream().RoundTrip(req)
	if !errors.Is(err, errMetadataAddress) {
		t.Fatalf("err = %v, want errMetadataAddress", err)
	}
}
