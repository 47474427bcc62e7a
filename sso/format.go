package sso

import (
	"fmt"
	"strconv"
)

func usd(v float64) string { return fmt.Sprintf("$%.2f", v) }
func itoa(v int64) string  { return strconv.FormatInt(v, 10) }
func percent(used, limit float64) int {
	if limit <= 0 {
		return 0
	}
	p := int(used / limit * 100)
	return min(p, 100)
}
