package store

import "testing"

func TestCheckBaseURL(t *testing.T) {
	for _, c := range []struct {
		in      string
		allowMD bool
		want    string // "" means rejected
	}{
		{"https://api.openai.com/", false, "https://api.openai.com"},
		{"https://api.groq.com/openai", false, "https://api.groq.com/openai"},
		{"http://127.0.0.1:11434", false, "http://127.0.0.1:11434"},
		{"http://192.168.1.10:8000/v1/", false, "http://192.168.1.10:8000/v1"},
		{"http://[::1]:8080", false, "http://[::1]:8080"},
		{"http://my-llm.internal", false, "http://my-llm.internal"},
		{"http://cafe", false, "http://cafe"},
		{"http://169.254.169.254", false, ""},
		{"http://169.254.169.254", true, "http://169.254.169.254"},
		{"http://[fe80::1%25eth0]/", false, ""},
		{"http://[fd00:ec2::254]/", false, ""},
		{"http://metadata/", false, ""},
		{"http://2852039166", false, ""},
		{"http://0xA9FEA9FE", false, ""},
		// A name that resolves to a metadata address passes here: only a
		// check at dial time (the proxy's dialer) can see through DNS.
		{"http://169.254.169.254.nip.io", false, "http://169.254.169.254.nip.io"},
		{"http://example.com:99999", false, ""},
		{"http://exa mple.com", false, ""},
		{"https://", false, ""},
		{"javascript:alert(1)", false, ""},
		{"//example.com", false, ""},
	} {
		got, err := checkBaseURL(c.in, c.allowMD)
		if c.want == "" {
			if err == nil {
				t.Errorf("checkBaseURL(%q) = %q, want an error", c.in, got)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("checkBaseURL(%q) = %q, %v; want %q", c.in, got, err, c.want)
		}
	}
}
