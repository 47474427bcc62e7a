package meter

// ensureStreamUsageScan is EnsureStreamUsage as it was before it used
// InspectRequest's positions: a scan of its own. It is the oracle that
// pins RequestInfo.WithStreamUsage to the same edits.
func ensureStreamUsageScan(body []byte) (newBody []byte, added bool) {
	var (
		stream          bool
		optsVS, optsVE  = -1, -1
		lastValEnd      = -1
		includeVS       = -1
		includeVE       = -1
		includeOK       bool
		optsObjectEmpty bool
	)
	ok := eachMember(body, func(key, val []byte, _, vs, ve int) bool {
		lastValEnd = ve
		switch string(memberName(key)) {
		case "stream":
			stream = string(val) == "true"
		case "stream_options":
			optsVS, optsVE = vs, ve
		}
		return true
	})
	if !ok || !stream || lastValEnd < 0 {
		return body, false
	}
	if optsVS < 0 {
		// No stream_options: add it after the last member.
		const add = `,"stream_options":{` + includeUsageMember + `}`
		out := make([]byte, 0, len(body)+len(add))
		out = append(out, body[:lastValEnd]...)
		out = append(out, add...)
		return append(out, body[lastValEnd:]...), true
	}
	opts := body[optsVS:optsVE]
	switch {
	case string(opts) == "null":
		const repl = `{` + includeUsageMember + `}`
		out := make([]byte, 0, len(body)+len(repl))
		out = append(out, body[:optsVS]...)
		out = append(out, repl...)
		return append(out, body[optsVE:]...), true
	case len(opts) > 0 && opts[0] == '{':
		optsObjectEmpty = true
		if !eachMember(opts, func(k, v []byte, _, vs, ve int) bool {
			optsObjectEmpty = false
			if string(memberName(k)) == "include_usage" {
				includeVS, includeVE = optsVS+vs, optsVS+ve
				includeOK = string(v) == "true"
			}
			return true
		}) {
			return body, false
		}
	default:
		return body, false
	}
	if includeOK {
		return body, false
	}
	if includeVS >= 0 {
		// "include_usage":false (or null): flip the value.
		out := make([]byte, 0, len(body)+4)
		out = append(out, body[:includeVS]...)
		out = append(out, "true"...)
		return append(out, body[includeVE:]...), true
	}
	ins := optsVS + 1 // just past the '{'
	add := includeUsageMember + ","
	if optsObjectEmpty {
		add = includeUsageMember
	}
	out := make([]byte, 0, len(body)+len(add))
	out = append(out, body[:ins]...)
	out = append(out, add...)
	return append(out, body[ins:]...), true
}
