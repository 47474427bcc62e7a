package meter

import (
	"bytes"
	"encoding/json"
	"mime/multipart"
	"net/http"
	"reflect"
	"strings"
	"testing"
)

func TestInspectRequest(t *testing.T) {
	cases := []struct {
		name string
		body string
		want RequestInfo
	}{
		{"chat stream", `{"model":"gpt-4o","messages":[{"role":"user","content":"hi \"model\":\"x\""}],"stream":true}`,
			RequestInfo{Model: "gpt-4o", Stream: true, Object: true}},
		{"include usage", `{"stream_options":{"include_usage":true},"model":"gpt-4o-mini","stream":true}`,
			RequestInfo{Model: "gpt-4o-mini", Stream: true, IncludeUsage: true, Object: true}},
		{"include usage false", `{"model":"m","stream":true,"stream_options":{"include_usage":false}}`,
			RequestInfo{Model: "m", Stream: true, Object: true}},
		{"not streaming", ` { "model" : "claude-sonnet-4-5" , "max_tokens": 1024, "stream": false } `,
			RequestInfo{Model: "claude-sonnet-4-5", MaxTokens: 1024, Object: true}},
		{"max completion tokens", `{"model":"o3","max_completion_tokens":4096,"max_tokens":null}`,
			RequestInfo{Model: "o3", MaxTokens: 4096, Object: true}},
		{"gemini max output", `{"contents":[],"generationConfig":{"temperature":0.2,"maxOutputTokens":800}}`,
			RequestInfo{MaxTokens: 800, Object: true}},
		{"bad max tokens", `{"max_tokens":-5,"max_output_tokens":"9"}`, RequestInfo{Object: true}},
		{"escaped model", `{"model":"a\u002fb"}`, RequestInfo{Model: "a/b", Object: true}},
		{"nested model ignored", `{"metadata":{"model":"x","stream":true}}`, RequestInfo{Object: true}},
		{"gemini body", `{"contents":[{"parts":[{"text":"hi"}]}]}`, RequestInfo{Object: true}},
		{"array", `[{"model":"x"}]`, RequestInfo{}},
		{"truncated", `{"model":"gpt-4o","messages":[`, RequestInfo{}},
		{"empty", ``, RequestInfo{}},
		{"not json", `model=gpt-4o`, RequestInfo{}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := InspectRequest([]byte(tc.body))
			got.usage = usageSpot{} // positions: pinned by TestWithStreamUsageMatchesScan
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestEnsureStreamUsage(t *testing.T) {
	cases := []struct {
		name  string
		body  string
		want  string // "" means unchanged
		added bool
	}{
		{"absent", `{"model":"gpt-4o","messages":[],"stream":true}`,
			`{"model":"gpt-4o","messages":[],"stream":true,"stream_options":{"include_usage":true}}`, true},
		{"absent pretty", "{\n  \"model\": \"gpt-4o\",\n  \"stream\": true\n}\n",
			"{\n  \"model\": \"gpt-4o\",\n  \"stream\": true,\"stream_options\":{\"include_usage\":true}\n}\n", true},
		{"empty options", `{"stream":true,"stream_options":{}}`,
			`{"stream":true,"stream_options":{"include_usage":true}}`, true},
		{"other options", `{"stream":true,"stream_options":{"x":1}}`,
			`{"stream":true,"stream_options":{"include_usage":true,"x":1}}`, true},
		{"false", `{"stream":true,"stream_options":{"include_usage":false}}`,
			`{"stream":true,"stream_options":{"include_usage":true}}`, true},
		{"null options", `{"stream":true,"stream_options":null}`,
			`{"stream":true,"stream_options":{"include_usage":true}}`, true},
		{"already", `{"stream":true,"stream_options":{"include_usage":true}}`, "", false},
		{"not streaming", `{"model":"gpt-4o","stream":false}`, "", false},
		{"no stream field", `{"model":"gpt-4o"}`, "", false},
		{"not an object", `[1,2]`, "", false},
		{"truncated", `{"model":"gpt-4o","stream":true`, "", false},
		{"garbage", `\x00\xff`, "", false},
		{"options not object", `{"stream":true,"stream_options":"yes"}`, "", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			in := []byte(tc.body)
			orig := string(in)
			got, added := EnsureStreamUsage(in)
			if string(in) != orig {
				t.Fatal("input modified")
			}
			want := tc.want
			if want == "" {
				want = tc.body
			}
			if added != tc.added || string(got) != want {
				t.Fatalf("got %q, %v; want %q, %v", got, added, want, tc.added)
			}
			if added {
				if !json.Valid(got) {
					t.Fatalf("invalid JSON: %s", got)
				}
				if ri := InspectRequest(got); !ri.IncludeUsage || !ri.Stream {
					t.Fatalf("InspectRequest after = %+v", ri)
				}
				var a, b map[string]any
				json.Unmarshal(in, &a)
				json.Unmarshal(got, &b)
				delete(a, "stream_options")
				delete(b, "stream_options")
				if !reflect.DeepEqual(a, b) {
					t.Fatalf("other fields changed: %v vs %v", a, b)
				}
			}
		})
	}
}

// TestWithStreamUsageMatchesScan pins RequestInfo.WithStreamUsage, which
// edits the body at the positions InspectRequest recorded, to the edits of
// a scan of its own (ensureStreamUsageScan): same body out, same added,
// also for a body with a byte order mark, whitespace, escaped names,
// repeated members, and a body other than the one inspected.
func TestWithStreamUsageMatchesScan(t *testing.T) {
	bodies := []string{
		`{"model":"gpt-4o","messages":[],"stream":true}`,
		"{\n  \"model\": \"gpt-4o\",\n  \"stream\": true\n}\n",
		`{"stream":true,"stream_options":{}}`,
		`{"stream":true,"stream_options":{ }}`,
		`{"stream":true,"stream_options":{"x":1}}`,
		`{"stream":true,"stream_options":{"include_usage":false}}`,
		`{"stream":true,"stream_options":{"include_usage":null,"x":[1]}}`,
		`{"stream":true,"stream_options":{"include_usage":true,"include_usage":false}}`,
		`{"stream":true,"stream_options":{"include_usage":false,"include_usage":true}}`,
		`{"stream":true,"stream_options":{"include_usage":true},"stream_options":{}}`,
		`{"stream":true,"stream_options":{},"stream_options":{"include_usage":true}}`,
		`{"stream":true,"stream_options":null}`,
		`{"stream":true,"stream_options":"yes"}`,
		`{"stream":true,"stream_options":{"x":}}`,
		`{"stream":true,"stream":false}`,
		`{"stream":false,"stream":true}`,
		`{"str\u0065am":true,"stream_\u006fptions":{"include_\u0075sage":false}}`,
		"\xef\xbb\xbf{\"stream\":true}",
		` {"stream":true} `,
		`{"stream":true`,
		`[1,2]`,
		`{}`,
		``,
	}
	for _, b := range bodies {
		want, wantAdded := ensureStreamUsageScan([]byte(b))
		got, added := InspectRequest([]byte(b)).WithStreamUsage([]byte(b))
		if added != wantAdded || string(got) != string(want) {
			t.Errorf("%q: WithStreamUsage = %q, %v; the scan gives %q, %v", b, got, added, want, wantAdded)
		}
	}
	// Another body than the one inspected (a different length) is read
	// again rather than edited at the wrong places.
	ri := InspectRequest([]byte(`{"stream":true}`))
	other := `{"model":"m","stream":true}`
	if got, added := ri.WithStreamUsage([]byte(other)); !added || string(got) != `{"model":"m","stream":true,"stream_options":{"include_usage":true}}` {
		t.Errorf("another body: %q, %v", got, added)
	}
}

func TestModelFromPath(t *testing.T) {
	cases := map[string]string{
		"/v1beta/models/gemini-2.0-flash:generateContent":                                                      "gemini-2.0-flash",
		"/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse":                                          "gemini-2.5-pro",
		"/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-flash:streamGenerateContent": "gemini-2.5-flash",
		"/v1beta/models/text-embedding-004:embedContent":                                                       "text-embedding-004",
		"/v1beta/models":                   "",
		"/v1/chat/completions":             "",
		"/v1beta/tunedModels/abc:generate": "",
		"":                                 "",
	}
	for path, want := range cases {
		if got := ModelFromPath(path); got != want {
			t.Errorf("ModelFromPath(%q) = %q, want %q", path, got, want)
		}
	}
	if !IsStreamPath("/v1beta/models/g:streamGenerateContent") || IsStreamPath("/v1beta/models/g:generateContent") {
		t.Error("IsStreamPath")
	}
}

func TestAcceptsStreamOptions(t *testing.T) {
	for path, want := range map[string]bool{
		"/v1/chat/completions":             true,
		"/openai/v1/chat/completions?x=1":  true,
		"/v1/completions":                  true,
		"/v1/responses":                    false,
		"/v1/messages":                     false,
		"/v1beta/openai/chat/completions/": true,
	} {
		if got := AcceptsStreamOptions(path); got != want {
			t.Errorf("AcceptsStreamOptions(%q) = %v", path, got)
		}
	}
}

func TestDetectFamily(t *testing.T) {
	cases := []struct {
		base, path, ct string
		want           Family
	}{
		{"https://api.openai.com", "/v1/chat/completions", "application/json", FamilyOpenAI},
		{"https://api.groq.com", "/openai/v1/chat/completions", "text/event-stream", FamilyOpenAI},
		{"https://api.openai.com", "/v1/responses", "", FamilyOpenAI},
		{"https://api.anthropic.com", "/v1/messages", "application/json", FamilyAnthropic},
		{"https://generativelanguage.googleapis.com", "/v1beta/models/gemini-2.0-flash:generateContent", "", FamilyGemini},
		{"https://generativelanguage.googleapis.com", "/v1beta/openai/chat/completions", "", FamilyOpenAI},
		{"https://api.openai.com", "/v1/audio/speech", "audio/mpeg", FamilyNone},
		{"https://api.anthropic.com", "/v1/models", "", FamilyAnthropic},
		{"https://api.exa.ai", "/search", "application/json", FamilyNone},
	}
	for _, tc := range cases {
		if got := DetectFamily(tc.base, tc.path, tc.ct); got != tc.want {
			t.Errorf("DetectFamily(%q, %q, %q) = %v, want %v", tc.base, tc.path, tc.ct, got, tc.want)
		}
	}
}

func TestParseFamily(t *testing.T) {
	for s, want := range map[string]Family{"": FamilyNone, "OpenAI": FamilyOpenAI, "anthropic": FamilyAnthropic, "google": FamilyGemini} {
		got, err := ParseFamily(s)
		if err != nil || got != want {
			t.Errorf("ParseFamily(%q) = %v, %v", s, got, err)
		}
	}
	if _, err := ParseFamily("cohere"); err == nil {
		t.Error("ParseFamily(cohere): no error")
	}
	var cfg struct{ Family Family }
	if err := json.Unmarshal([]byte(`{"Family":"gemini"}`), &cfg); err != nil || cfg.Family != FamilyGemini {
		t.Errorf("unmarshal: %v %v", cfg.Family, err)
	}
	if b, _ := json.Marshal(cfg); string(b) != `{"Family":"gemini"}` {
		t.Errorf("marshal: %s", b)
	}
}

func TestNegotiateIdentity(t *testing.T) {
	h := http.Header{"Accept-Encoding": {"gzip, br"}}
	NegotiateIdentity(h)
	if h.Get("Accept-Encoding") != "identity" {
		t.Fatal(h)
	}
}

func TestInspectRequestModelNames(t *testing.T) {
	cases := []struct {
		name, body string
		model      string
		ambiguous  bool
	}{
		{"escaped key", `{"mod\u0065l":"gpt-4o","messages":[]}`, "gpt-4o", false},
		{"escaped key upper hex", `{"\u006D\u006f\u0064\u0065\u006c":"gpt-4o"}`, "gpt-4o", false},
		{"escaped stream key", `{"model":"m","str\u0065am":true}`, "m", false},
		{"repeated same", `{"model":"a","model":"a"}`, "a", false},
		{"repeated different", `{"model":"a","model":"b"}`, "b", true},
		{"escaped repeat", `{"model":"a","mod\u0065l":"b"}`, "b", true},
		{"null", `{"model":null}`, "", true},
		{"number", `{"model":4}`, "", true},
		{"empty", `{"model":""}`, "", true},
		{"model_id", `{"text":"hi","model_id":"eleven_turbo_v2"}`, "eleven_turbo_v2", false},
		{"model and model_id differ", `{"model":"a","model_id":"b"}`, "a", true},
		{"bom", "\xef\xbb\xbf{\"model\":\"gpt-4o\"}", "gpt-4o", false},
		{"bad escape", `{"mod\x":"gpt-4o"}`, "", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := InspectRequest([]byte(tc.body))
			if got.Model != tc.model || got.ModelAmbiguous != tc.ambiguous {
				t.Fatalf("got %+v, want model %q ambiguous %v", got, tc.model, tc.ambiguous)
			}
		})
	}
	if ri := InspectRequest([]byte(`{"model":"m","str\u0065am":true,"stream_\u006fptions":{"include_\u0075sage":true},"max_\u0074okens":9}`)); !ri.Stream || !ri.IncludeUsage || ri.MaxTokens != 9 {
		t.Errorf("escaped member names: %+v", ri)
	}
	if b, added := EnsureStreamUsage([]byte(`{"model":"m","str\u0065am":true}`)); !added || string(b) != `{"model":"m","str\u0065am":true,"stream_options":{"include_usage":true}}` {
		t.Errorf("EnsureStreamUsage with an escaped stream key: %s %v", b, added)
	}
}

func TestEachPathModel(t *testing.T) {
	for path, want := range map[string]string{
		"/v1beta/models/gemini-2.5-pro:generateContent":                                              "gemini-2.5-pro",
		"/v1/projects/p/locations/l/publishers/google/models/gemini-2.0-flash:streamGenerateContent": "gemini-2.0-flash",
		"/v1beta/Models/gemini-2.5-pro:generateContent":                                              "gemini-2.5-pro",
		"/v1beta/models/a:generateContent/models/b":                                                  "a,b",
		"/v1beta/tunedModels/mine:generateContent":                                                   "",
		"/v1/chat/completions?x=/models/y":                                                           "",
	} {
		var got []string
		EachPathModel(path, func(m string) { got = append(got, m) })
		if strings.Join(got, ",") != want {
			t.Errorf("%s: %v, want %s", path, got, want)
		}
	}
}

func TestEachFormModel(t *testing.T) {
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	fw, _ := mw.CreateFormFile("file", "a.wav")
	_, _ = fw.Write([]byte("RIFF"))
	_ = mw.WriteField("model", "whisper-1")
	_ = mw.WriteField("model_id", "scribe_v1")
	_ = mw.Close()
	cases := []struct {
		name, ct, body string
		want           string
		form, ok       bool
	}{
		{"multipart", mw.FormDataContentType(), buf.String(), "whisper-1,scribe_v1", true, true},
		{"urlencoded", "application/x-www-form-urlencoded", "prompt=hi&model=gpt-4o&model=o3", "gpt-4o,o3", true, true},
		{"json", "application/json", `{"model":"x"}`, "", false, true},
		{"no boundary", "multipart/form-data", "x", "", true, false},
		{"truncated", mw.FormDataContentType(), buf.String()[:buf.Len()-20], "whisper-1,scribe_v1", true, false},
		{"bad media type", "multipart/form-data; boundary", "x", "", true, false},
	}
	for _, tc := range cases {
		var got []string
		form, ok := EachFormModel(tc.ct, []byte(tc.body), func(m string) { got = append(got, m) })
		if strings.Join(got, ",") != tc.want || form != tc.form || ok != tc.ok {
			t.Errorf("%s: %v form=%v ok=%v, want %s %v %v", tc.name, got, form, ok, tc.want, tc.form, tc.ok)
		}
		// RequestInfo.ReadForm records the same.
		ri := InspectRequest([]byte(tc.body))
		ri.ReadForm(tc.ct, []byte(tc.body))
		if strings.Join(ri.FormModels, ",") != tc.want || ri.Form != tc.form || ri.FormUnreadable != (tc.form && !tc.ok) {
			t.Errorf("%s: ReadForm %+v, want %s form=%v ok=%v", tc.name, ri, tc.want, tc.form, tc.ok)
		}
	}
}

func TestRequiresModel(t *testing.T) {
	cases := []struct {
		path             string
		hasBody, metered bool
		want             bool
	}{
		{"/v1/chat/completions", true, true, true},
		{"/v1/chat/completions", true, false, true},
		{"/V1/Chat/Completions/", true, false, true},
		{"/v1/chat/completions", false, true, false}, // GET: list stored completions
		{"/v1/models", false, true, false},
		{"/v1/files", true, true, false},
		{"/v1/batches", true, true, false},
		{"/v1/threads/t1/messages", true, true, false},
		{"/v1/threads/../chat/completions", true, true, true},
		{"/v1/realtime", false, true, true},
		{"/v1/listen", true, false, true},
		{"/v1/listen", false, false, true},
		{"/v1/text-to-speech/voice1", true, false, true},
		{"/v1beta/tunedModels/x:generateContent", true, false, true},
		{"/v1/audio/transcriptions", true, false, true},
		{"/search", true, false, false},
		{"/v1/anything", true, true, true},
	}
	for _, tc := range cases {
		if got := RequiresModel(tc.path, tc.hasBody, tc.metered); got != tc.want {
			t.Errorf("RequiresModel(%q, %v, %v) = %v", tc.path, tc.hasBody, tc.metered, got)
		}
	}
}
