package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keypool/keypool/server"
)

// login signs in through the admin API and returns the status and the
// access token.
func login(t *testing.T, url, user, pw string) (int, string) {
	t.Helper()
	body, _ := json.Marshal(map[string]string{"username": user, "password": pw})
	resp, err := http.Post(url+"/admin/auth/login", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out struct {
		AccessToken string `json:"access_token"`
	}
	_ = json.NewDecoder(resp.Body).Decode(&out)
	return resp.StatusCode, out.AccessToken
}

func TestZeroConfigAdminPassword(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	url, stdout, stderr, stop := startServe(t, dir, map[string]string{})
	b, err := os.ReadFile(filepath.Join(dir, "data", server.AdminPasswordFile))
	if err != nil {
		t.Fatal(err)
	}
	pw := strings.TrimSpace(string(b))
	if strings.Count(stdout.String(), pw) != 1 || !strings.Contains(stdout.String(), "username: admin") {
		t.Errorf("first start did not print the admin password once:\n%s", stdout.String())
	}
	if strings.Contains(stderr.String(), pw) {
		t.Error("admin password in the logs")
	}
	if code, tok := login(t, url, "admin", pw); code != 200 || !strings.HasPrefix(tok, "kps_") {
		t.Fatalf("sign in with the printed password: %d %q", code, tok)
	}
	if c := stop(); c != 0 {
		t.Fatalf("exit %d", c)
	}
	_, stdout2, _, stop2 := startServe(t, dir, map[string]string{})
	if strings.Contains(stdout2.String(), pw) {
		t.Error("admin password printed again on the second start")
	}
	stop2()
}

func TestCLIAdminUser(t *testing.T) {
	dir := t.TempDir()
	admin := "kpadm_cli_test_token_abcdefghijklmnop"
	url, _, _, _ := startServe(t, dir, map[string]string{
		"KEYPOOL_ADMIN_TOKEN":    admin,
		"KEYPOOL_ENCRYPTION_KEY": strings.Repeat("ab", 32),
		"KEYPOOL_DATABASE":       "sqlite:" + filepath.Join(dir, "k.db"),
	})
	e := map[string]string{"KEYPOOL_URL": url, "KEYPOOL_ADMIN_TOKEN": admin}
	cli := func(stdin string, args ...string) (int, string) {
		t.Helper()
		var out, errb bytes.Buffer
		c := run(context.Background(), args, mapEnv(e), strings.NewReader(stdin), &out, &errb)
		return c, out.String() + errb.String()
	}
	if c, out := cli("correct horse battery\n", "admin-user", "add", "--username", "alice", "--role", "admin"); c != 0 || !strings.Contains(out, "added admin user alice") {
		t.Fatalf("add: %d %s", c, out)
	}
	if c, out := cli("short\n", "admin-user", "add", "--username", "bob"); c == 0 || !strings.Contains(out, "password must be") {
		t.Errorf("weak password accepted: %d %s", c, out)
	}
	c, out := cli("", "admin-user", "list")
	if c != 0 || !strings.Contains(out, "alice") || strings.Contains(out, "argon2") || strings.Contains(out, "correct horse") {
		t.Errorf("list: %d %s", c, out)
	}
	code, tok := login(t, url, "alice", "correct horse battery")
	if code != 200 {
		t.Fatalf("login: %d", code)
	}
	if c, out := cli("a new long password\n", "admin-user", "passwd", "alice"); c != 0 || !strings.Contains(out, "changed the password") {
		t.Fatalf("passwd: %d %s", c, out)
	}
	req, _ := http.NewRequest("GET", url+"/admin/services", nil)
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 401 {
		t.Errorf("session after a password change: %d, want 401", resp.StatusCode)
	}
	if code, _ := login(t, url, "alice", "correct horse battery"); code != 401 {
		t.Errorf("old password: %d, want 401", code)
	}
	if code, _ := login(t, url, "alice", "a new long password"); code != 200 {
		t.Errorf("new password: %d, want 200", code)
	}
	if c, out := cli("", "admin-user", "disable", "alice"); c != 0 {
		t.Fatalf("disable: %d %s", c, out)
	}
	if code, _ := login(t, url, "alice", "a new long password"); code != 401 {
		t.Errorf("disabled user signed in: %d", code)
	}
}
