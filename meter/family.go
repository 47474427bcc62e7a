package meter

import (
	"fmt"
	"net/url"
	"strings"
)

// Family names the wire format of an upstream's LLM responses: where the
// token counts and the model name sit. Configure it per service; use
// [DetectFamily] only as a fallback.
type Family uint8

// The response families a [Reader] understands.
const (
	// FamilyNone meters nothing: the body passes through untouched.
	FamilyNone Family = iota
	// FamilyOpenAI is the OpenAI wire format and every OpenAI-compatible
	// API (Groq, Together, Mistral, DeepSeek, OpenRouter, vLLM, ...):
	// Chat Completions, Completions, Embeddings and the Responses API,
	// JSON and SSE.
	FamilyOpenAI
	// FamilyAnthropic is the Anthropic Messages API, JSON and SSE.
	FamilyAnthropic
	// FamilyGemini is the Gemini API (generativelanguage and Vertex AI):
	// generateContent JSON, and streamGenerateContent as SSE (alt=sse) or
	// as a streamed JSON array.
	FamilyGemini
)

var familyNames = [...]string{"none", "openai", "anthropic", "gemini"}

// String returns the family's configuration name: "none", "openai",
// "anthropic" or "gemini".
func (f Family) String() string {
	if int(f) < len(familyNames) {
		return familyNames[f]
	}
	return fmt.Sprintf("Family(%d)", f)
}

// ParseFamily returns the family named s (case-insensitive). The empty
// string is [FamilyNone]; "google" and "vertex" mean [FamilyGemini];
// "openai-compatible" and "groq" mean [FamilyOpenAI].
func ParseFamily(s string) (Family, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", "none", "off":
		return FamilyNone, nil
	case "openai", "openai-compatible", "openai_compatible", "groq":
		return FamilyOpenAI, nil
	case "anthropic", "claude":
		return FamilyAnthropic, nil
	case "gemini", "google", "vertex":
		return FamilyGemini, nil
	}
	return FamilyNone, fmt.Errorf("meter: unknown family %q (want none, openai, anthropic or gemini)", s)
}

// MarshalText encodes the family as its name, so it reads well in JSON and
// YAML configuration.
func (f Family) MarshalText() ([]byte, error) { return []byte(f.String()), nil }

// UnmarshalText decodes a family name accepted by [ParseFamily].
func (f *Family) UnmarshalText(b []byte) error {
	v, err := ParseFamily(string(b))
	if err != nil {
		return err
	}
	*f = v
	return nil
}

// DetectFamily guesses a response family from the upstream base URL, the
// request path and the response Content-Type (each may be empty). The path
// wins over the host, because some hosts serve several formats (Gemini's
// OpenAI-compatible endpoint is /v1beta/openai/chat/completions). A
// response whose Content-Type is neither JSON nor an event stream (audio,
// images) is [FamilyNone]. Configure the family per service when you can:
// this is a heuristic.
func DetectFamily(baseURL, path, respContentType string) Family {
	if respContentType != "" && !meterableContentType(respContentType) {
		return FamilyNone
	}
	p := strings.ToLower(path)
	switch {
	case strings.Contains(p, "/chat/completions"),
		strings.HasSuffix(p, "/completions"),
		strings.Contains(p, "/responses"),
		strings.HasSuffix(p, "/embeddings"):
		return FamilyOpenAI
	case strings.Contains(p, "/threads/"): // OpenAI Assistants
		return FamilyOpenAI
	case strings.HasSuffix(p, "/messages"), strings.Contains(p, "/messages?"):
		return FamilyAnthropic
	case strings.Contains(p, ":generatecontent"), strings.Contains(p, ":streamgeneratecontent"):
		return FamilyGemini
	}
	host := baseURL
	if u, err := url.Parse(baseURL); err == nil && u.Host != "" {
		host = u.Host
	}
	host = strings.ToLower(host)
	switch {
	case strings.Contains(host, "anthropic"):
		return FamilyAnthropic
	case strings.Contains(host, "generativelanguage.googleapis.com"),
		strings.Contains(host, "aiplatform.googleapis.com"):
		return FamilyGemini
	case strings.Contains(host, "openai"), strings.Contains(host, "groq.com"),
		strings.Contains(host, "together"), strings.Contains(host, "mistral.ai"),
		strings.Contains(host, "deepseek.com"), strings.Contains(host, "openrouter.ai"),
		strings.Contains(host, "fireworks.ai"), strings.Contains(host, "x.ai"),
		strings.Contains(host, "perplexity.ai"), strings.Contains(host, "cerebras.ai"):
		return FamilyOpenAI
	}
	return FamilyNone
}

// meterableContentType reports whether a response Content-Type can carry
// token usage: JSON, NDJSON or an SSE stream.
func meterableContentType(ct string) bool {
	ct = strings.ToLower(ct)
	return strings.Contains(ct, "json") || strings.Contains(ct, "event-stream")
}

// IsEventStream reports whether a Content-Type is text/event-stream.
func IsEventStream(contentType string) bool {
	return strings.HasPrefix(strings.ToLower(strings.TrimSpace(contentType)), "text/event-stream")
}
