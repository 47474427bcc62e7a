package main

import (
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"runtime/debug"
	"strings"
	"testing"
)

func TestVersionCommand(t *testing.T) {
	old, oldCommit := version, commit
	t.Cleanup(func() { version, commit = old, oldCommit })
	version, commit = "v9.8.7", "0123abcd"
	code, out, errs := runArgs(t, nil, "version")
	if code != 0 || errs != "" {
		t.Fatalf("keypoold version: exit %d, stderr %q", code, errs)
	}
	for _, want := range []string{"keypoold v9.8.7\n", "commit:   0123abcd\n", "go:       " + runtime.Version() + "\n",
		"module:   github.com/keypool/keypool\n", "platform: " + runtime.GOOS + "/" + runtime.GOARCH} {
		if !strings.Contains(out, want) {
			t.Errorf("keypoold version: no %q in\n%s", want, out)
		}
	}
	if code, _, errs := runArgs(t, nil, "version", "extra"); code != 2 || !strings.Contains(errs, `unexpected argument "extra"`) {
		t.Errorf("keypoold version extra: exit %d, stderr %q", code, errs)
	}
}

func TestReadBuildInfo(t *testing.T) {
	installed := &debug.BuildInfo{GoVersion: "go1.99.1", Main: debug.Module{Path: "github.com/keypool/keypool", Version: "v0.1.0"}}
	checkout := &debug.BuildInfo{GoVersion: "go1.99.2", Main: debug.Module{Path: "github.com/keypool/keypool", Version: "(devel)"},
		Settings: []debug.BuildSetting{{Key: "vcs.revision", Value: "feedface"}, {Key: "vcs.modified", Value: "true"}}}
	for _, tc := range []struct {
		name             string
		stamped, stampC  string
		bi               *debug.BuildInfo
		ok               bool
		version, commitW string
		goVersion        string
		modified         bool
	}{
		{"go install @version", "", "", installed, true, "v0.1.0", "unknown", "go1.99.1", false},
		{"checkout with VCS", "", "", checkout, true, "(devel)", "feedface", "go1.99.2", true},
		{"stamped wins", "v1.2.3", "c0ffee", checkout, true, "v1.2.3", "c0ffee", "go1.99.2", true},
		{"no build info", "", "", nil, false, "(devel)", "unknown", runtime.Version(), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := readBuildInfo(tc.stamped, tc.stampC, tc.bi, tc.ok)
			if got.Version != tc.version || got.Commit != tc.commitW || got.GoVersion != tc.goVersion || got.Modified != tc.modified {
				t.Errorf("got %+v, want version %s commit %s go %s modified %v", got, tc.version, tc.commitW, tc.goVersion, tc.modified)
			}
		})
	}
}

func TestServerURL(t *testing.T) {
	for _, tc := range []struct{ url, listen, want string }{
		{"", "", "http://127.0.0.1:8080"},
		{"", ":9090", "http://127.0.0.1:9090"},
		{"", "0.0.0.0:9091", "http://127.0.0.1:9091"},
		{"", "[::]:9092", "http://127.0.0.1:9092"},
		{"", "127.0.0.2:9093", "http://127.0.0.2:9093"},
		{"", "[::1]:9094", "http://[::1]:9094"},
		{"", "garbage", "http://127.0.0.1:8080"},
		{"http://kp.internal:1234/", ":9090", "http://kp.internal:1234"},
	} {
		got := serverURL(mapEnv(map[string]string{envURL: tc.url, "KEYPOOL_LISTEN": tc.listen}))
		if got != tc.want {
			t.Errorf("serverURL(url %q, listen %q) = %q, want %q", tc.url, tc.listen, got, tc.want)
		}
	}
}

func TestHealthcheckAgainstServer(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	url, _, _, stop := startServe(t, dir, map[string]string{})
	listen := strings.TrimPrefix(url, "http://")
	e := map[string]string{"KEYPOOL_LISTEN": listen}
	for _, args := range [][]string{{"healthcheck"}, {"healthcheck", "--ready"}, {"healthcheck", "--url", url + "/"}} {
		code, out, errs := runArgs(t, e, args...)
		if code != 0 || errs != "" {
			t.Errorf("keypoold %s: exit %d, stdout %q, stderr %q", strings.Join(args, " "), code, out, errs)
		}
	}
	if c := stop(); c != 0 {
		t.Fatalf("serve exit %d", c)
	}
	// The server is gone: the port refuses connections.
	code, _, errs := runArgs(t, e, "healthcheck")
	if code != 1 || !strings.Contains(errs, "keypoold: healthcheck /healthz:") {
		t.Errorf("healthcheck of a stopped server: exit %d, stderr %q", code, errs)
	}
}

func TestHealthcheckFailures(t *testing.T) {
	block := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/healthz":
			w.WriteHeader(http.StatusOK)
		case "/readyz":
			http.Error(w, `{"error":{"message":"not ready: shutting down"}}`, http.StatusServiceUnavailable)
		case "/slow/healthz":
			<-block
		case "/moved/healthz":
			http.Redirect(w, r, "/healthz", http.StatusFound)
		}
	}))
	t.Cleanup(srv.Close)
	t.Cleanup(func() { close(block) })
	for _, tc := range []struct {
		name string
		args []string
		code int
		errs string
	}{
		{"healthy", []string{"--url", srv.URL}, 0, ""},
		{"not ready", []string{"--ready", "--url", srv.URL}, 1, "/readyz: 503 Service Unavailable: {\"error\":{\"message\":\"not ready: shutting down\"}}"},
		{"timeout", []string{"--url", srv.URL + "/slow", "--timeout", "100ms"}, 1, "context deadline exceeded"},
		{"redirect is not health", []string{"--url", srv.URL + "/moved"}, 1, "302 Found"},
		{"credentials stay out of errors", []string{"--url", "http://user:hunter2@" + closedAddr(t)}, 1, "connection refused"},
		{"bad flag", []string{"--frob"}, 2, "flag provided but not defined: -frob"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, errs := runArgs(t, nil, append([]string{"healthcheck"}, tc.args...)...)
			if code != tc.code || !strings.Contains(errs, tc.errs) {
				t.Errorf("exit %d, stderr %q; want %d with %q", code, errs, tc.code, tc.errs)
			}
			if strings.Contains(errs, "hunter2") {
				t.Errorf("password in the error: %q", errs)
			}
		})
	}
}

// closedAddr returns a loopback address nothing listens on.
func closedAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

func TestLocalCommandsInHelp(t *testing.T) {
	t.Chdir(t.TempDir())
	_, out, _ := runArgs(t, nil, "-h")
	for _, want := range []string{"  healthcheck ", "  version "} {
		if !strings.Contains(out, want) {
			t.Errorf("keypoold -h: no %q in\n%s", want, out)
		}
	}
	for _, args := range [][]string{{"help", "healthcheck"}, {"healthcheck", "-h"}} {
		code, out, errs := runArgs(t, nil, args...)
		if code != 0 || errs != "" || !strings.Contains(out, "Usage: keypoold healthcheck") || !strings.Contains(out, "-ready") {
			t.Errorf("keypoold %s: exit %d, stdout %q, stderr %q", strings.Join(args, " "), code, out, errs)
		}
	}
}
