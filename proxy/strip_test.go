package proxy

import (
	"encoding/base64"
	"fmt"
	"net/url"
	"strings"
	"testing"

	"github.com/keypool/keypool"
)

// TestHandlerStripsTokenByValue is the attack of issue 16 item 4: the team
// token, sent beside a valid credential in headers and query parameters
// keypoold does not know by name, must not reach the upstream; in the
// body or the path, which keypoold forwards as they are, it is refused.
func TestHandlerStripsTokenByValue(t *testing.T) {
	up := newUpstream(t, okScript)
	e := newProxy(t, up.URL, keypool.Bearer, []string{"good"}, nil)
	b64 := base64.StdEncoding.EncodeToString([]byte("user:" + teamToken))
	headers := []string{
		"Api-Key", teamToken,
		"X-Auth-Token", teamToken,
		"Ocp-Apim-Subscription-Key", teamToken,
		"Anthropic-Api-Key", teamToken,
		"X-Custom", "Bearer " + teamToken,
		"X-Basic", "Basic " + b64,
		"X-Escaped", url.QueryEscape("t=" + teamToken),
		"X-Request-Id", "req-" + teamToken,
		"X-Kept", "a value",
		"Accept-Encoding", "gzip, br",
	}
	query := "?alt=sse&access_token=" + teamToken + "&token=" + teamToken + "&API_KEY=" + teamToken +
		"&b=" + url.QueryEscape(b64) + "&n=1&z=last"
	resp, b := e.do(t, "POST", "/v1/svc/x"+query, strings.NewReader(`{"model":"m"}`), headers...)
	if resp.StatusCode != 200 {
		t.Fatalf("status %d %s", resp.StatusCode, b)
	}
	h := up.Hits()[0]
	if all := h.uri + fmt.Sprint(h.header) + string(h.body); strings.Contains(all, teamToken) || strings.Contains(all, b64) || strings.Contains(all, url.QueryEscape(b64)) {
		t.Errorf("the team token reached the upstream: %s %v", h.uri, h.header)
	}
	if h.uri != "/x?alt=sse&n=1&z=last" {
		t.Errorf("uri %q, want the other parameters kept in order", h.uri)
	}
	if h.header.Get("Accept-Encoding") != "identity" {
		t.Errorf("Accept-Encoding %q, want identity (answers must be readable to be scrubbed)", h.header.Get("Accept-Encoding"))
	}
	if h.header.Get("X-Kept") != "a value" || h.header.Get("Authorization") != "Bearer "+goodSecret {
		t.Errorf("headers %v", h.header)
	}

	refused := []struct{ name, path, ctype, body string }{
		{"json field", "/v1/svc/x", "application/json", `{"model":"m","api_key":"` + teamToken + `"}`},
		{"json escaped", "/v1/svc/x", "application/json", `{"k":"` + strings.ReplaceAll(teamToken, "_", `\u005f`) + `"}`},
		{"form field", "/v1/svc/x", "application/x-www-form-urlencoded", "a=1&key2=" + url.QueryEscape(teamToken)},
		{"base64 in body", "/v1/svc/x", "text/plain", "cred " + base64.StdEncoding.EncodeToString([]byte(teamToken))},
		{"path", "/v1/svc/x/" + teamToken, "", ""},
	}
	for _, tt := range refused {
		t.Run(tt.name, func(t *testing.T) {
			before := len(up.Hits())
			resp, b := e.do(t, "POST", tt.path, strings.NewReader(tt.body), "Content-Type", tt.ctype)
			if resp.StatusCode != 400 || errorCode(t, b) != "bad_request" || strings.Contains(string(b), teamToken) {
				t.Errorf("got %d %s, want 400 bad_request without the token", resp.StatusCode, b)
			}
			if len(up.Hits()) != before {
				t.Errorf("the request reached the upstream")
			}
			res := waitFor(t, e.done, "OnDone")
			if strings.Contains(fmt.Sprint(res), teamToken) || strings.Contains(e.logs.String(), teamToken) {
				t.Errorf("the token leaked into the result or logs")
			}
		})
	}
	// The token's escaped JSON form with a unicode escape must be caught:
	// check the case ran on a token that has an underscore.
	if !strings.Contains(teamToken, "_") {
		t.Fatal("teamToken has no underscore: the json escaped case cannot fail")
	}
}
