package server

import "testing"

func TestAcceptsStreamOptions(t *testing.T) {
	for url, want := range map[string]bool{
		"https://api.openai.com":              true,
		"https://api.groq.com/openai":         true,
		"https://myres.openai.azure.com":      true,
		"https://api.mistral.ai":              false,
		"http://127.0.0.1:8000":               false,
		"https://api.openai.com.evil.example": false,
		"https://openrouter.ai/api":           true,
		"::bad url":                           false,
	} {
		if got := acceptsStreamOptions(url); got != want {
			t.Errorf("acceptsStreamOptions(%q) = %v, want %v", url, got, want)
		}
	}
}
