package main

import (
	"bytes"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	_ "github.com/keypool/keypool/store/sqlstore" // registers the sqlite3 driver
)

// crashChildEnv makes the test binary run keypoold itself (see TestMain).
const crashChildEnv = "KEYPOOL_TEST_CRASH_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(crashChildEnv) == "1" {
		main()
		return
	}
	os.Exit(m.Run())
}

// crashKP is a keypoold child process.
type crashKP struct {
	t     *testing.T
	cmd   *exec.Cmd
	url   string
	admin string
}

func startCrashKP(t *testing.T, dir, addr string) *crashKP {
	t.Helper()
	k := &crashKP{t: t, url: "http://" + addr, admin: "kpadm_crash_test_admin_token_0123456789"}
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(),
		crashChildEnv+"=1",
		"KEYPOOL_LISTEN="+addr,
		"KEYPOOL_DATABASE=sqlite:"+filepath.Join(dir, "keypool.db"),
		"KEYPOOL_DATA_DIR="+dir,
		"KEYPOOL_ADMIN_TOKEN="+k.admin,
		"KEYPOOL_ENCRYPTION_KEY=000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
		"KEYPOOL_LOG_LEVEL=warn",
	)
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = io.Discard, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	k.cmd = cmd
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := http.Get(k.url + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return k
			}
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			t.Fatalf("keypoold did not get ready: %s", logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (k *crashKP) kill() {
	_ = k.cmd.Process.Signal(syscall.SIGKILL)
	_ = k.cmd.Wait()
}

func (k *crashKP) stop() {
	_ = k.cmd.Process.Signal(syscall.SIGTERM)
	if err := k.cmd.Wait(); err != nil {
		k.t.Errorf("keypoold exit after SIGTERM: %v", err)
	}
}

func (k *crashKP) adminJSON(method, path string, body any) map[string]any {
	k.t.Helper()
	b, _ := json.Marshal(body)
	req, _ := http.NewRequest(method, k.url+path, bytes.NewReader(b))
	req.Header.Set("Authorization", "Bearer "+k.admin)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		k.t.Fatal(err)
	}
	defer resp.Body.Close()
	var m map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&m)
	if resp.StatusCode >= 300 {
		k.t.Fatalf("%s %s: %d %v", method, path, resp.StatusCode, m)
	}
	return m
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// TestKillNineLosesNoUsage runs keypoold as a child process under load
// and kills it with SIGKILL several times (KEYPOOL_TEST_KILLS, default 4),
// restarting it each time. Every request a client got a complete 200 for
// and every request the upstream answered has exactly one usage record
// (the journal replayed on the restart: a provisional record is journaled
// before a request goes out to a key); no request has two; and the key's
// balance_used (unit: requests) equals its 2xx records.
func TestKillNineLosesNoUsage(t *testing.T) {
	if testing.Short() {
		t.Skip("starts and kills keypoold processes")
	}
	kills := 4
	if v, err := strconv.Atoi(os.Getenv("KEYPOOL_TEST_KILLS")); err == nil && v > 0 {
		kills = v
	}
	var umu sync.Mutex
	served := map[string]int{}
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"id":"c","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":100,"completion_tokens":50,"total_tokens":150}}`)
		umu.Lock()
		served[r.Header.Get("X-Request-Id")]++
		umu.Unlock()
	}))
	defer up.Close()

	dir := t.TempDir()
	addr := freeAddr(t)
	k := startCrashKP(t, dir, addr)
	k.adminJSON("POST", "/admin/services", map[string]any{"name": "llm", "base_url": up.URL, "auth_scheme": "bearer", "llm_family": "openai"})
	key := k.adminJSON("POST", "/admin/keys", map[string]any{"service": "llm", "key_value": "sk-crash-0123456789abcdef",
		"balance_total": 1e12, "balance_unit": "requests"})
	team := k.adminJSON("POST", "/admin/teams", map[string]any{"name": "eng"})
	tok := k.adminJSON("POST", "/admin/tokens", map[string]any{"name": "load", "team_id": team["id"]})["token"].(string)

	type done struct {
		id string
		at time.Time
	}
	var mu sync.Mutex
	var ok []done
	killedAt := make([]time.Time, 0, kills)
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 16}, Timeout: 5 * time.Second}
	body := `{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}],"max_tokens":50}`
	for round := range kills {
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for c := range 8 {
			wg.Go(func() {
				for n := 0; ; n++ {
					select {
					case <-stop:
						return
					default:
					}
					id := fmt.Sprintf("crash-%d-%d-%d", round, c, n)
					req, _ := http.NewRequest("POST", k.url+"/v1/llm/v1/chat/completions", bytes.NewReader([]byte(body)))
					req.Header.Set("Authorization", "Bearer "+tok)
					req.Header.Set("X-Request-Id", id)
					resp, err := client.Do(req)
					if err != nil {
						continue // killed
					}
					b, err := io.ReadAll(resp.Body)
					resp.Body.Close()
					if err == nil && resp.StatusCode == 200 && bytes.Contains(b, []byte(`"total_tokens":150`)) {
						mu.Lock()
						ok = append(ok, done{id, time.Now()})
						mu.Unlock()
					}
				}
			})
		}
		time.Sleep(time.Duration(150+rand.IntN(350)) * time.Millisecond)
		killedAt = append(killedAt, time.Now())
		k.kill()
		close(stop)
		wg.Wait()
		client.CloseIdleConnections()
		k = startCrashKP(t, dir, addr)
	}
	k.stop() // the last start replayed the last kill's journal

	db, err := sql.Open("sqlite3", filepath.Join(dir, "keypool.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	rows, err := db.Query("SELECT request_id, COUNT(*), MAX(status) FROM usage_records GROUP BY request_id")
	if err != nil {
		t.Fatal(err)
	}
	recorded := map[string]int{}
	total, ok2xx, interrupted := 0, 0, 0
	for rows.Next() {
		var id string
		var n, status int
		if err := rows.Scan(&id, &n, &status); err != nil {
			t.Fatal(err)
		}
		recorded[id] = n
		total += n
		switch {
		case status >= 200 && status < 300:
			ok2xx++
		case status == 0:
			// A provisional record: sent to a key when keypoold died, the
			// answer unknown; charged its estimate.
			interrupted++
		}
		if served[id] == 0 && status != 0 {
			t.Errorf("record (status %d) for request %s the upstream never served", status, id)
		}
	}
	rows.Close()
	dups := 0
	for id, n := range recorded {
		if n > 1 {
			dups++
			t.Errorf("request %s has %d usage records", id, n)
		}
	}
	lost, raced := 0, 0
	for _, d := range ok {
		if recorded[d.id] > 0 {
			continue
		}
		nearKill := false
		for _, ka := range killedAt {
			if d.at.Before(ka.Add(20*time.Millisecond)) && d.at.After(ka.Add(-20*time.Millisecond)) {
				nearKill = true
			}
		}
		if nearKill {
			raced++
		} else {
			lost++
			t.Errorf("request %s answered 200 at %v has no usage record", d.id, d.at.Format("15:04:05.000"))
		}
	}
	servedNoRecord := 0
	for id := range served {
		if recorded[id] == 0 {
			servedNoRecord++
		}
	}
	var balance float64
	if err := db.QueryRow("SELECT balance_used FROM keys WHERE id = ?", key["id"]).Scan(&balance); err != nil {
		t.Fatal(err)
	}
	if balance != float64(ok2xx) {
		t.Errorf("key balance_used %v, want %d (one per 2xx record)", balance, ok2xx)
	}
	if servedNoRecord != 0 {
		t.Errorf("%d requests the upstream answered have no usage record", servedNoRecord)
	}
	t.Logf("%d kills: %d answered 200, %d usage records (%d with a 2xx, %d interrupted), %d lost, %d answered within 20ms of a kill without a record, "+
		"%d duplicated; upstream answers without a record %d of %d; balance_used %v",
		kills, len(ok), total, ok2xx, interrupted, lost, raced, dups, servedNoRecord, len(served), balance)
	if len(ok) < kills*10 {
		t.Fatalf("only %d requests answered: the load did not run", len(ok))
	}
}
