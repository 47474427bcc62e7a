package admin

import (
	"bytes"
	"encoding/json"
	"strconv"
	"time"

	"github.com/keypool/keypool/store"
)

// timeoutsInput holds a service's upstream timeouts as POST and PATCH
// /admin/services take them: a duration string ("150ms", "10m") or a
// number of seconds; 0 or null means the server's default.
type timeoutsInput struct {
	HeaderTimeout  opt[json.RawMessage] `json:"header_timeout"`
	IdleTimeout    opt[json.RawMessage] `json:"idle_timeout"`
	RequestTimeout opt[json.RawMessage] `json:"request_timeout"`
}

// timeoutsView shows a service's timeouts as duration strings; absent
// means the server's default.
type timeoutsView struct {
	HeaderTimeout  string `json:"header_timeout,omitempty"`
	IdleTimeout    string `json:"idle_timeout,omitempty"`
	RequestTimeout string `json:"request_timeout,omitempty"`
}

func viewTimeouts(s store.Service) timeoutsView {
	str := func(d time.Duration) string {
		if d <= 0 {
			return ""
		}
		return d.String()
	}
	return timeoutsView{str(s.HeaderTimeout), str(s.IdleTimeout), str(s.RequestTimeout)}
}

// apply validates the present fields and copies them into s.
func (in *timeoutsInput) apply(s *store.Service) error {
	for _, f := range [...]struct {
		name string
		in   opt[json.RawMessage]
		dst  *time.Duration
	}{
		{"header_timeout", in.HeaderTimeout, &s.HeaderTimeout},
		{"idle_timeout", in.IdleTimeout, &s.IdleTimeout},
		{"request_timeout", in.RequestTimeout, &s.RequestTimeout},
	} {
		if !f.in.Set {
			continue
		}
		d, err := parseTimeout(f.name, f.in)
		if err != nil {
			return err
		}
		*f.dst = d
	}
	return nil
}

func parseTimeout(name string, in opt[json.RawMessage]) (time.Duration, error) {
	if in.Null {
		return 0, nil
	}
	raw := bytes.TrimSpace(in.V)
	var d time.Duration
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		v, err := time.ParseDuration(s)
		if err != nil {
			return 0, badRequest("%s must be a duration such as \"150ms\" or \"10m\", or a number of seconds", name)
		}
		d = v
	} else {
		f, err := strconv.ParseFloat(string(raw), 64)
		if err != nil {
			return 0, badRequest("%s must be a duration such as \"150ms\" or \"10m\", or a number of seconds", name)
		}
		if f > store.MaxServiceTimeout.Seconds() {
			f = store.MaxServiceTimeout.Seconds() + 1
		}
		d = time.Duration(f * float64(time.Second))
	}
	return d, nil // its range is store.Validator's
}
