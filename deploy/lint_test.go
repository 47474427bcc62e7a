package deploy

import (
	"testing"

	"helm.sh/helm/v3/pkg/lint"
	"helm.sh/helm/v3/pkg/lint/support"
)

// TestChartLint runs what "helm lint --strict" runs (Chart.yaml, values
// and schema, templates rendered and parsed, deprecated APIs) for the
// default and the full values: a warning fails as an error does.
func TestChartLint(t *testing.T) {
	for name, vals := range map[string]map[string]any{"defaults": nil, "full": fullValues()} {
		t.Run(name, func(t *testing.T) {
			l := lint.All(chartDir, vals, "keypool", false)
			for _, m := range l.Messages {
				if m.Severity >= support.WarningSev {
					t.Errorf("helm lint: %s", m)
				} else {
					t.Logf("helm lint: %s", m)
				}
			}
		})
	}
}
