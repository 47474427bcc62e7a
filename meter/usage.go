package meter

// Usage is the token usage of one LLM response.
//
// InputTokens counts every input token, cached ones included, in every
// family: for Anthropic it is input_tokens + cache_read_input_tokens +
// cache_creation_input_tokens; for OpenAI and Gemini it is the reported
// prompt count, which already includes cached tokens. CachedTokens and
// CacheWriteTokens are parts of InputTokens, so [Cost] never bills a token
// twice.
type Usage struct {
	// Model is the model named by the response, or the request's model
	// ([Options.Model]) when the response names none.
	Model string
	// InputTokens is the number of input (prompt) tokens, cached included.
	InputTokens int64
	// OutputTokens is the number of output tokens, reasoning or thinking
	// tokens included (Gemini's thoughtsTokenCount is added here, since
	// it is billed as output).
	OutputTokens int64
	// CachedTokens is the part of InputTokens read from a prompt cache.
	CachedTokens int64
	// CacheWriteTokens is the part of InputTokens written to a prompt
	// cache (Anthropic's cache_creation_input_tokens), billed at
	// [Price.CacheWrite].
	CacheWriteTokens int64
	// Images and Characters are not read from responses: a caller that
	// bills an image or speech endpoint sets them (for example from the
	// request) before calling [Cost].
	Images, Characters int64
	// TextBytes is how many bytes of generated text (the "content" and
	// "text" strings) an OpenAI-family answer without usage carried (zero
	// when Found): the basis of an output estimate (see [EstimateTokens]).
	TextBytes int64
	// Found reports whether the response carried any token usage.
	Found bool
	// Shaped reports whether the answer had the OpenAI shape (a
	// "choices" member); only looked for with [Options.CheckShape].
	Shaped bool
	// Complete reports whether the body was read to its end (EOF). A
	// stream closed early has Complete == false and, depending on the
	// family, partial or no usage.
	Complete bool
}

// Cost returns the price in USD of u at p. Cached input tokens are billed
// at p.CachedInput, cache writes at p.CacheWrite (each falling back to
// p.Input when zero), the rest of the input at p.Input and output at
// p.Output, all per million tokens; then Images × PerImage, Characters ×
// PerCharacter and one PerRequest. A negative or inconsistent count (more
// cached than input tokens) is clamped rather than billed negative.
func Cost(u Usage, p Price) float64 {
	cached := max(u.CachedTokens, 0)
	write := max(u.CacheWriteTokens, 0)
	in := max(u.InputTokens, 0)
	if cached > in {
		cached = in
	}
	if write > in-cached {
		write = in - cached
	}
	plain := in - cached - write
	cachedPrice := p.CachedInput
	if cachedPrice == 0 {
		cachedPrice = p.Input
	}
	writePrice := p.CacheWrite
	if writePrice == 0 {
		writePrice = p.Input
	}
	usd := (float64(plain)*p.Input +
		float64(cached)*cachedPrice +
		float64(write)*writePrice +
		float64(max(u.OutputTokens, 0))*p.Output) / 1e6
	usd += float64(max(u.Images, 0))*p.PerImage + float64(max(u.Characters, 0))*p.PerCharacter + p.PerRequest
	return usd
}
