package deploy

import (
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
)

// upstreamKeys stands for the Secret fullValues' extraEnv reads.
var upstreamKeys = map[string]map[string]string{"upstream-keys": {"openai-1": "sk-deploytest-0123456789"}}

// podEnv returns the environment of the rendered Deployment's container,
// as the kubelet would set it: plain values, and secretKeyRefs read from
// the rendered Secret or from external (secret name → key → value). A
// missing optional key leaves its variable unset; a missing required one
// fails. Paths under the keys of mounts (the container's /data, …) are
// mapped to their values.
func podEnv(t *testing.T, r rendered, mounts map[string]string, external map[string]map[string]string) []string {
	t.Helper()
	secrets := map[string]map[string]string{}
	for name, keys := range external {
		secrets[name] = keys
	}
	for k, o := range r.objects {
		if s, ok := o.(*corev1.Secret); ok && strings.HasPrefix(k, "Secret/") {
			secrets[s.Name] = map[string]string{}
			for key, v := range s.Data {
				secrets[s.Name][key] = string(v)
			}
		}
	}
	mapPath := func(v string) string {
		for from, to := range mounts {
			if v == from || strings.HasPrefix(v, from+"/") {
				return to + strings.TrimPrefix(v, from)
			}
			if rest, ok := strings.CutPrefix(v, "sqlite:"+from); ok {
				return "sqlite:" + to + rest
			}
		}
		return v
	}
	c := get[*appsv1.Deployment](t, r, "Deployment").Spec.Template.Spec.Containers[0]
	if len(c.EnvFrom) > 0 {
		t.Fatalf("podEnv does not resolve envFrom: %+v", c.EnvFrom)
	}
	var env []string
	for _, e := range c.Env {
		if e.ValueFrom == nil {
			env = append(env, e.Name+"="+mapPath(e.Value))
			continue
		}
		ref := e.ValueFrom.SecretKeyRef
		if ref == nil {
			t.Fatalf("%s: podEnv resolves only secretKeyRef: %+v", e.Name, e.ValueFrom)
		}
		v, ok := secrets[ref.Name][ref.Key]
		switch {
		case ok:
			env = append(env, e.Name+"="+v)
		case ref.Optional == nil || !*ref.Optional:
			t.Fatalf("%s: the pod would not start: secret %s has no key %s", e.Name, ref.Name, ref.Key)
		}
	}
	return env
}

// keypooldProc is a keypoold started by a test.
type keypooldProc struct {
	cmd    *exec.Cmd
	exited chan error
	logs   syncBuf
}

// startKeypoold runs "bin serve" in dir with env (and attr's credentials)
// until the test ends or stop is called.
func startKeypoold(t *testing.T, bin, dir string, env []string, attr *syscall.SysProcAttr) *keypooldProc {
	t.Helper()
	p := &keypooldProc{cmd: exec.Command(bin, "serve"), exited: make(chan error, 1)}
	p.cmd.Dir, p.cmd.Env, p.cmd.SysProcAttr = dir, env, attr
	p.cmd.Stdout, p.cmd.Stderr = &p.logs, &p.logs
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.exited <- p.cmd.Wait() }()
	t.Cleanup(func() {
		if p.cmd.ProcessState == nil {
			p.cmd.Process.Kill()
			<-p.exited
		}
	})
	return p
}

// stop sends SIGTERM and wants a clean exit within 40 seconds.
func (p *keypooldProc) stop(t *testing.T) {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-p.exited:
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v\n%s", err, p.logs.String())
		}
	case <-time.After(40 * time.Second):
		t.Fatalf("no exit 40s after SIGTERM\n%s", p.logs.String())
	}
}

// TestChartSecretsReachKeypoold runs keypoold with the environment the
// chart gives its pod when every secret is set (the seed's
// secrets.googleClientId, googleClientSecret and authBaseUrl among them):
// each Secret key must land in the variable keypoold reads, so that it
// uses the admin token and encryption key given, turns on Google sign-in
// with the shared state secret, and generates none of them.
func TestChartSecretsReachKeypoold(t *testing.T) {
	bin := buildKeypoold(t)
	data := t.TempDir()
	r := mustRender(t, map[string]any{
		"log": map[string]any{"format": "text"},
		"secrets": map[string]any{
			"adminToken": testAdminToken, "encryptionKey": testEncKey,
			"googleClientId": "123456789-abc.apps.googleusercontent.com", "googleClientSecret": "GOCSPX-secret",
			"authBaseUrl": "https://proxy.internal", "oidcStateSecret": testStateSecret,
		},
	})
	addr := freeAddr(t)
	env := append(podEnv(t, r, map[string]string{"/data": data}, nil), "HOME="+data, "KEYPOOL_LISTEN="+addr,
		// Discovery at start is bounded; keep it short, Google is not
		// reachable from here.
		"KEYPOOL_OIDC_TIMEOUT=1s")
	srv := startKeypoold(t, bin, data, env, nil)
	base := "http://" + addr
	waitReady(t, base, srv.exited, &srv.logs)

	for token, want := range map[string]int{testAdminToken: http.StatusOK, "not-the-token": http.StatusUnauthorized} {
		req, _ := http.NewRequest(http.MethodGet, base+"/admin/services", nil)
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("GET /admin/services with token %q: %d, want %d", token, resp.StatusCode, want)
		}
	}
	// Sign-in is on: /auth/login exists (it answers, whatever Google's
	// reachability, with something else than 404).
	noRedirect := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := noRedirect.Get(base + "/auth/login")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode == http.StatusNotFound {
		t.Errorf("GET /auth/login: 404: GOOGLE_CLIENT_ID did not reach keypoold\n%s", srv.logs.String())
	}
	// The provider is tried once at start in the background, and
	// keypoold's log lines reach the output through a short buffer.
	for deadline := time.Now().Add(15 * time.Second); !strings.Contains(srv.logs.String(), "accounts.google.com") && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
	}
	if logs := srv.logs.String(); !strings.Contains(logs, "accounts.google.com") {
		t.Errorf("no sign-in with Google in the logs:\n%s", logs)
	}

	hc := exec.Command(bin, "healthcheck", "--ready")
	hc.Env = []string{"KEYPOOL_LISTEN=" + addr}
	if out, err := hc.CombinedOutput(); err != nil {
		t.Errorf("keypoold healthcheck --ready on a ready server: %v\n%s", err, out)
	}
	srv.stop(t)
	// Nothing answers now: the container health check must fail (exit 1).
	hc = exec.Command(bin, "healthcheck")
	hc.Env = []string{"KEYPOOL_LISTEN=" + addr}
	out, err := hc.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !strings.Contains(string(out), "healthcheck /healthz") {
		t.Errorf("keypoold healthcheck on a stopped server: %v\n%s", err, out)
	}

	// The secrets came from the Secret: keypoold generated none.
	for _, f := range []string{"admin_token", "encryption.key", "oidc_state.secret"} {
		if _, err := os.Stat(filepath.Join(data, f)); err == nil {
			t.Errorf("keypoold generated %s although the chart's Secret sets it", f)
		}
	}
	if logs := srv.logs.String(); strings.Contains(logs, testAdminToken) || strings.Contains(logs, "GOCSPX-secret") || strings.Contains(logs, testStateSecret) {
		t.Errorf("a secret appears in keypoold's output:\n%s", logs)
	}
}
