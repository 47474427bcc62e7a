package main

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	_ "github.com/mattn/go-sqlite3" // reads keypoold's usage records from its SQLite file
)

// faultAdminToken is the admin token of the keypoold processes the fault
// suite starts; they listen on loopback only.
const faultAdminToken = "kpadm_faults_admin_token_not_secret_0000"

// probeClient makes the suite's own calls to keypoold (readiness, admin
// API, metrics) without keep-alive, so that they leave no connection open
// in keypoold between measurements.
var probeClient = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}

// buildKeypoold compiles ./cmd/keypoold (without -race) into dir and
// returns the binary's path.
func buildKeypoold(ctx context.Context, dir string) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", errors.New("not inside the keypool module: run from its checkout or pass -keypoold")
	}
	bin := filepath.Join(dir, "keypoold")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/keypoold")
	cmd.Dir = filepath.Dir(mod)
	cmd.Env = append(os.Environ(), "GOFLAGS=")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./cmd/keypoold: %w\n%s", err, b)
	}
	return bin, nil
}

// serviceSpec is what a scenario declares in keypoold's YAML file.
type serviceSpec struct {
	name      string
	keys      int
	llmFamily string // "openai" or "none"
}

// keypoold is one keypoold server run as a separate process, as an
// operator runs it: environment variables, a YAML file of services and
// keys (secrets by ${ENV} reference), SQLite in dir, and the admin API
// for the team and its token. It can be killed and restarted on the same
// data directory and address.
type keypoold struct {
	bin   string
	dir   string
	addr  string
	env   []string
	token string // the team token, once created

	cmd    *exec.Cmd
	exited chan struct{}
	state  *os.ProcessState
	logf   *os.File
	starts int
}

// newKeypoold prepares (does not start) keypoold on a free loopback port
// with svc on upstream.
func newKeypoold(bin, dir, upstreamURL string, svc serviceSpec, logLevel string, drain time.Duration) (*keypoold, error) {
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	var y strings.Builder
	fmt.Fprintf(&y, "services:\n  - name: %s\n    base_url: %s\n    auth_scheme: bearer\n    llm_family: %s\n    keys:\n", svc.name, upstreamURL, svc.llmFamily)
	env := []string{
		"KEYPOOL_LISTEN=" + addr,
		"KEYPOOL_DATABASE=sqlite:" + filepath.Join(dir, "keypool.db"),
		"KEYPOOL_DATA_DIR=" + dir,
		"KEYPOOL_ADMIN_TOKEN=" + faultAdminToken,
		"KEYPOOL_ENCRYPTION_KEY=000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
		"KEYPOOL_CONFIG=" + filepath.Join(dir, "keypool.yaml"),
		"KEYPOOL_LOG_LEVEL=" + logLevel,
		"KEYPOOL_DRAIN_TIMEOUT=" + drain.String(),
		"PATH=" + os.Getenv("PATH"),
		"HOME=" + dir,
	}
	for i := range svc.keys {
		fmt.Fprintf(&y, "      - key_value: ${FAULT_KEY_%d}\n", i)
		env = append(env, fmt.Sprintf("FAULT_KEY_%d=%s", i, keySecret(i)))
	}
	if err := os.WriteFile(filepath.Join(dir, "keypool.yaml"), []byte(y.String()), 0o600); err != nil {
		return nil, err
	}
	return &keypoold{bin: bin, dir: dir, addr: addr, env: env}, nil
}

// freeAddr returns a loopback address with a port free at the time.
func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// start runs the process and waits until /readyz answers 200.
func (k *keypoold) start(ctx context.Context) error {
	if k.logf == nil {
		f, err := os.OpenFile(filepath.Join(k.dir, "keypoold.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			return err
		}
		k.logf = f
	}
	cmd := exec.Command(k.bin, "serve")
	cmd.Dir = k.dir
	cmd.Env = k.env
	cmd.Stdout = k.logf
	cmd.Stderr = k.logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return err
	}
	k.starts++
	k.cmd, k.exited, k.state = cmd, make(chan struct{}), nil
	exited := k.exited
	go func() { _ = cmd.Wait(); close(exited) }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case <-exited:
			return fmt.Errorf("keypoold exited at start (%s): see %s", cmd.ProcessState, k.logf.Name())
		default:
		}
		if ctx.Err() != nil || time.Now().After(deadline) {
			k.kill()
			return fmt.Errorf("keypoold not ready after 30s: see %s", k.logf.Name())
		}
		if resp, err := probeClient.Get("http://" + k.addr + "/readyz"); err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// pid returns the running process's id.
func (k *keypoold) pid() int { return k.cmd.Process.Pid }

// kill sends SIGKILL and waits for the process to be gone.
func (k *keypoold) kill() {
	if k.cmd == nil {
		return
	}
	_ = k.cmd.Process.Signal(syscall.SIGKILL)
	<-k.exited
}

// terminate sends SIGTERM and waits up to wait for the exit; it returns
// the exit code (-1 when killed after wait).
func (k *keypoold) terminate(wait time.Duration) int {
	_ = k.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-k.exited:
	case <-time.After(wait):
		k.kill()
	}
	return k.cmd.ProcessState.ExitCode()
}

// close stops the process if it runs and closes its log; calling it
// again does nothing.
func (k *keypoold) close() {
	if k.cmd != nil {
		select {
		case <-k.exited:
		default:
			k.terminate(10 * time.Second)
		}
	}
	if k.logf != nil {
		_ = k.logf.Close()
		k.logf = nil
	}
}

// admin calls the admin API and decodes a JSON answer into out.
func (k *keypoold) admin(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://"+k.addr+path, body)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+faultAdminToken)
	req.Header.Set("Content-Type", "application/json")
	resp, err := probeClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("%s %s: %d %s", method, path, resp.StatusCode, b)
	}
	if out != nil {
		return json.Unmarshal(b, out)
	}
	return nil
}

// createClient creates a team without limits and a token for it through
// the admin API, and keeps the token.
func (k *keypoold) createClient(ctx context.Context) error {
	var team struct{ ID string }
	if err := k.admin(ctx, "POST", "/admin/teams", map[string]any{"name": "faults"}, &team); err != nil {
		return err
	}
	var tok struct{ Token string }
	if err := k.admin(ctx, "POST", "/admin/tokens", map[string]any{"name": "faults", "team_id": team.ID}, &tok); err != nil {
		return err
	}
	if tok.Token == "" {
		return errors.New("POST /admin/tokens returned no token")
	}
	k.token = tok.Token
	return nil
}

// keyState is a key as GET /admin/keys shows it.
type keyState struct {
	ID            string     `json:"id"`
	State         string     `json:"state"`
	Breaker       string     `json:"breaker"`
	Status        string     `json:"status"`
	CooldownUntil *time.Time `json:"cooldown_until"`
}

// keys returns the service's keys as the admin API shows them.
func (k *keypoold) keys(ctx context.Context, service string) ([]keyState, error) {
	var out struct{ Keys []keyState }
	err := k.admin(ctx, "GET", "/admin/keys?service="+service, nil, &out)
	return out.Keys, err
}

// fds counts the process's open file descriptors.
func (k *keypoold) fds() (int, error) {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", k.pid()))
	return len(ents), err
}

// goroutines reads go_goroutines from /metrics.
func (k *keypoold) goroutines(ctx context.Context) (int, error) {
	req, err := http.NewRequestWithContext(ctx, "GET", "http://"+k.addr+"/metrics", nil)
	if err != nil {
		return 0, err
	}
	resp, err := probeClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "go_goroutines "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			return int(f), err
		}
	}
	return 0, errors.New("/metrics has no go_goroutines")
}

// usageRecord is one row of keypoold's usage_records table.
type usageRecord struct {
	requestID string
	status    int
	tokens    int64
}

// usageRecords reads every usage record from the SQLite file (the store
// keypoold writes, read as an auditor would).
func (k *keypoold) usageRecords(ctx context.Context) ([]usageRecord, error) {
	db, err := sql.Open("sqlite3", "file:"+filepath.Join(k.dir, "keypool.db")+"?mode=ro&_busy_timeout=5000")
	if err != nil {
		return nil, err
	}
	defer db.Close()
	rows, err := db.QueryContext(ctx, "SELECT request_id, status, tokens_in + tokens_out FROM usage_records")
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []usageRecord
	for rows.Next() {
		var r usageRecord
		if err := rows.Scan(&r.requestID, &r.status, &r.tokens); err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, rows.Err()
}
