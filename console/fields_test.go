package console_test

import (
	"html"
	"net/url"
	"strings"
	"testing"
)

// TestServiceFormEveryField checks that the service form offers every
// field GET /admin/services/{name} shows (the issue: "edit (every field of
// the admin API, with the validation messages the API gives)"), shows
// their values, saves them, and shows the API's message for a bad one.
func TestServiceFormEveryField(t *testing.T) {
	base, pw := startServer(t)
	all := map[string]any{
		"name": "full", "display_name": "Full", "description": "every field", "is_active": true,
		"base_url": "http://127.0.0.1:9", "auth_scheme": "x-api-key", "rate_limit_rpm": 60, "max_in_flight": 4,
		"proxy_headers": map[string]string{"X-A": "b"}, "selector": "least_used", "external_name": "fullext",
		"prices":         map[string]any{"m1": map[string]any{"input": 1, "output": 2}},
		"llm_family":     "openai",
		"header_timeout": "30s", "idle_timeout": "1m0s", "request_timeout": "5m0s",
		"retry_after_cap": 600, "confirm_refusals": 2, "min_active_keys": 1, "max_ejection_percent": 40,
		"rpm_limit": 100, "models_enabled": []string{"m1"},
	}
	if code, m := adminAPI(t, base, "POST", "/admin/services", all); code != 201 {
		t.Fatalf("create: %d %v", code, m)
	}
	_, svc := adminAPI(t, base, "GET", "/admin/services/full", nil)
	svc["classifier"] = "" // shown only when set; a field of the API all the same

	c := client(t)
	if resp, _ := post(t, c, base+"/console/login", url.Values{"username": {"admin"}, "password": {pw}}, nil); resp.StatusCode != 303 {
		t.Fatalf("sign in: %d", resp.StatusCode)
	}
	_, page := get(t, c, base+"/console/services/full/edit")
	for k := range svc {
		switch k {
		case "name", "created_at", "updated_at":
			continue // the name is the page's; the times are the server's
		}
		if !strings.Contains(page, `name="`+k+`"`) {
			t.Errorf("the service form has no field %q", k)
		}
	}
	for _, want := range []string{`value="30s"`, `value="every field"`, `value="600"`, `value="40"`} {
		if !strings.Contains(page, want) {
			t.Errorf("the edit form does not show %s", want)
		}
	}

	// Save through the form: switch the service off, change a timeout and
	// the key policy.
	form := url.Values{"description": {"changed"}, "is_active": {"false"}, "header_timeout": {"45s"}, "retry_after_cap": {"900"}}
	if resp, body := post(t, c, base+"/console/services/full/edit", form, nil); resp.StatusCode != 303 {
		t.Fatalf("save: %d %s", resp.StatusCode, body)
	}
	_, svc = adminAPI(t, base, "GET", "/admin/services/full", nil)
	if svc["description"] != "changed" || svc["is_active"] != false || svc["header_timeout"] != "45s" || svc["retry_after_cap"] != float64(900) ||
		svc["idle_timeout"] != "1m0s" || svc["max_ejection_percent"] != float64(40) {
		t.Errorf("after saving the form: %v", svc)
	}
	// The checkbox checked sends both values; the service is on again.
	form = url.Values{"is_active": {"false", "true"}}
	if resp, body := post(t, c, base+"/console/services/full/edit", form, nil); resp.StatusCode != 303 {
		t.Fatalf("save: %d %s", resp.StatusCode, body)
	}
	if _, svc = adminAPI(t, base, "GET", "/admin/services/full", nil); svc["is_active"] != true {
		t.Errorf("is_active after checking the box: %v", svc["is_active"])
	}
	// An empty timeout on edit clears it (the server's default).
	form = url.Values{"idle_timeout": {""}}
	if resp, body := post(t, c, base+"/console/services/full/edit", form, nil); resp.StatusCode != 303 {
		t.Fatalf("clear a timeout: %d %s", resp.StatusCode, body)
	}
	if _, svc = adminAPI(t, base, "GET", "/admin/services/full", nil); svc["idle_timeout"] != nil {
		t.Errorf("idle_timeout after clearing it: %v", svc["idle_timeout"])
	}

	// A bad value gets the API's own message.
	resp, body := post(t, c, base+"/console/services/full/edit", url.Values{"header_timeout": {"soon"}}, nil)
	if resp.StatusCode != 400 || !strings.Contains(html.UnescapeString(body), `header_timeout must be a duration such as "150ms"`) {
		t.Errorf("bad timeout: %d, want the API's message", resp.StatusCode)
	}
	_, page = get(t, c, base+"/console/services/new")
	if !strings.Contains(page, `name="is_active" value="true" checked`) {
		t.Errorf("a new service's form does not start switched on")
	}
}

// TestViewerSeesNoCreateButtons checks that a viewer's overview offers no
// "New service" (the API would refuse it anyway).
func TestViewerSeesNoCreateButtons(t *testing.T) {
	base, _ := startServer(t)
	if code, m := adminAPI(t, base, "POST", "/admin/admin-users", map[string]any{"username": "vera", "password": "vera-password-1", "role": "viewer"}); code != 201 {
		t.Fatalf("create viewer: %d %v", code, m)
	}
	c := client(t)
	if resp, _ := post(t, c, base+"/console/login", url.Values{"username": {"vera"}, "password": {"vera-password-1"}}, nil); resp.StatusCode != 303 {
		t.Fatalf("sign in: %d", resp.StatusCode)
	}
	for _, p := range []string{"/console/", "/console/live/overview", "/console/services"} {
		if _, page := get(t, c, base+p); strings.Contains(page, "/console/services/new") {
			t.Errorf("%s offers a viewer to create a service", p)
		}
	}
}
