package deploy

// The chart's refusals and the settings that change its shape: an
// existing Secret, SQLite without persistence, several replicas.

import (
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
)

func TestChartExistingSecret(t *testing.T) {
	r := mustRender(t, map[string]any{
		"replicaCount":   2,
		"existingSecret": "keypool-prod",
		"database":       map[string]any{"type": "postgres"},
	})
	if _, ok := r.objects["Secret/kp-keypool"]; ok || strings.Contains(strings.Join(r.kinds(), ","), "Secret") {
		t.Errorf("the chart rendered a Secret although existingSecret is set: %v", r.kinds())
	}
	d := get[*appsv1.Deployment](t, r, "Deployment")
	c := checkPod(t, d)
	if *d.Spec.Replicas != 2 {
		t.Errorf("replicas %d", *d.Spec.Replicas)
	}
	secretRef(t, c, "KEYPOOL_DATABASE", "keypool-prod", "database-url", false)
	secretRef(t, c, "KEYPOOL_ADMIN_TOKEN", "keypool-prod", "admin-token", false)
	secretRef(t, c, "KEYPOOL_ENCRYPTION_KEY", "keypool-prod", "encryption-key", false)
	secretRef(t, c, "KEYPOOL_REDIS_URL", "keypool-prod", "redis-url", true)
	secretRef(t, c, "GOOGLE_CLIENT_SECRET", "keypool-prod", "google-client-secret", true)
	secretRef(t, c, "AUTH_BASE_URL", "keypool-prod", "auth-base-url", true)
	secretRef(t, c, "KEYPOOL_OIDC_STATE_SECRET", "keypool-prod", "oidc-state-secret", true)
	if _, ok := d.Spec.Template.Annotations["checksum/secret"]; !ok {
		t.Error("no checksum/secret annotation")
	}
}

func TestChartSQLiteWithoutPersistence(t *testing.T) {
	r := mustRender(t, map[string]any{"persistence": map[string]any{"enabled": false}})
	if strings.Contains(strings.Join(r.kinds(), ","), "PersistentVolumeClaim") {
		t.Error("PVC rendered with persistence disabled")
	}
	d := get[*appsv1.Deployment](t, r, "Deployment")
	if v := volume(t, d, "data"); v.EmptyDir == nil {
		t.Errorf("data volume %+v, want an emptyDir", v)
	}
	r = mustRender(t, map[string]any{"persistence": map[string]any{"existingClaim": "kp-data"}})
	d = get[*appsv1.Deployment](t, r, "Deployment")
	if v := volume(t, d, "data"); v.PersistentVolumeClaim == nil || v.PersistentVolumeClaim.ClaimName != "kp-data" {
		t.Errorf("data volume %+v, want the existing claim", v)
	}
	if strings.Contains(strings.Join(r.kinds(), ","), "PersistentVolumeClaim") {
		t.Error("PVC rendered although existingClaim is set")
	}
}

func TestChartRefuses(t *testing.T) {
	postgres := map[string]any{"type": "postgres", "url": testDBURL}
	secrets := map[string]any{"adminToken": testAdminToken, "encryptionKey": testEncKey}
	for _, tc := range []struct {
		name string
		vals map[string]any
		want []string // all in the error
	}{
		// The chart's own checks (fail).
		{"replicas with SQLite", map[string]any{"replicaCount": 3},
			[]string{"replicaCount=3 needs database.type=postgres", "SQLite"}},
		{"autoscaling with SQLite", map[string]any{"autoscaling": map[string]any{"enabled": true}},
			[]string{"autoscaling.enabled needs database.type=postgres"}},
		{"postgres without a URL", map[string]any{"database": map[string]any{"type": "postgres"}, "secrets": secrets},
			[]string{"database.type=postgres needs database.url"}},
		{"postgres without shared secrets", map[string]any{"database": postgres},
			[]string{"needs secrets.adminToken and secrets.encryptionKey"}},
		{"URL with SQLite", map[string]any{"database": map[string]any{"url": testDBURL}},
			[]string{"database.url is set but database.type is sqlite"}},
		// Sign-in state made by one replica is checked by another: without
		// a shared state secret each pod would generate its own on its
		// emptyDir, and most sign-ins would fail.
		{"sign-in on PostgreSQL without a shared state secret", map[string]any{"database": postgres, "secrets": map[string]any{
			"adminToken": testAdminToken, "encryptionKey": testEncKey, "googleClientId": "id.apps.googleusercontent.com",
			"googleClientSecret": "GOCSPX-secret", "authBaseUrl": "https://proxy.internal"}},
			[]string{"secrets.googleClientId with database.type=postgres needs secrets.oidcStateSecret"}},
		{"max below min", map[string]any{"database": postgres, "secrets": secrets, "autoscaling": map[string]any{"enabled": true, "minReplicas": 5, "maxReplicas": 2}},
			[]string{"maxReplicas must not be below"}},
		// values.schema.json.
		{"replicas as a string", map[string]any{"replicaCount": "3"}, []string{"replicaCount"}},
		{"unknown top-level key", map[string]any{"replicas": 3}, []string{"replicas"}},
		{"unknown nested key", map[string]any{"database": map[string]any{"type": "postgres", "uri": testDBURL}}, []string{"uri"}},
		{"database type enum", map[string]any{"database": map[string]any{"type": "mysql"}}, []string{"database", "type"}},
		{"log level enum", map[string]any{"log": map[string]any{"level": "verbose"}}, []string{"log", "level"}},
		{"state secret too short", map[string]any{"secrets": map[string]any{"oidcStateSecret": "short"}}, []string{"oidcStateSecret"}},
		{"encryption key not hex", map[string]any{"secrets": map[string]any{"encryptionKey": "not-a-key"}}, []string{"encryptionKey"}},
		{"database URL not postgres", map[string]any{"database": map[string]any{"type": "postgres", "url": "mysql://x"}}, []string{"url"}},
		{"negative replicas", map[string]any{"replicaCount": -1}, []string{"replicaCount"}},
		{"service port range", map[string]any{"service": map[string]any{"port": 70000}}, []string{"port"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := render(t, tc.vals)
			if err == nil {
				t.Fatalf("rendered %v", tc.vals)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
			for _, secret := range []string{testDBURL, testEncKey, testAdminToken, "GOCSPX-secret"} {
				if strings.Contains(err.Error(), secret) {
					t.Errorf("error shows a secret value: %v", err)
				}
			}
		})
	}
}

func TestChartReplicasWithPostgres(t *testing.T) {
	r := mustRender(t, map[string]any{
		"replicaCount": 3,
		"database":     map[string]any{"type": "postgres", "url": testDBURL},
		"redis":        map[string]any{"url": testRedisURL},
		"secrets":      map[string]any{"adminToken": testAdminToken, "encryptionKey": testEncKey + "," + strings.Repeat("ab", 32)},
	})
	d := get[*appsv1.Deployment](t, r, "Deployment")
	checkPod(t, d)
	if *d.Spec.Replicas != 3 {
		t.Errorf("replicas %d, want 3", *d.Spec.Replicas)
	}
	if strings.Contains(strings.Join(r.kinds(), ","), "PersistentVolumeClaim") {
		t.Error("PVC rendered with PostgreSQL")
	}
}
