package deploy

import (
	"fmt"
	"reflect"
	"sort"
	"strings"
	"testing"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/releaseutil"
)

const chartDir = "helm/keypool"

// rendered is a chart rendered and decoded, one typed object per manifest.
type rendered struct {
	objects map[string]any // "Kind/name" → *appsv1.Deployment, …
	notes   string
}

func (r rendered) kinds() []string {
	var ks []string
	for k := range r.objects {
		ks = append(ks, strings.Split(k, "/")[0])
	}
	sort.Strings(ks)
	return ks
}

// get returns the one object of the kind, or fails.
func get[T any](t *testing.T, r rendered, kind string) T {
	t.Helper()
	var found []T
	for k, o := range r.objects {
		if strings.HasPrefix(k, kind+"/") {
			found = append(found, o.(T))
		}
	}
	if len(found) != 1 {
		t.Fatalf("want one %s, rendered %d (kinds %v)", kind, len(found), r.kinds())
	}
	return found[0]
}

// newObject returns an empty typed object for a rendered kind.
func newObject(apiVersion, kind string) (any, error) {
	switch apiVersion + " " + kind {
	case "apps/v1 Deployment":
		return &appsv1.Deployment{}, nil
	case "v1 Service":
		return &corev1.Service{}, nil
	case "v1 Secret":
		return &corev1.Secret{}, nil
	case "v1 ConfigMap":
		return &corev1.ConfigMap{}, nil
	case "v1 PersistentVolumeClaim":
		return &corev1.PersistentVolumeClaim{}, nil
	case "v1 ServiceAccount":
		return &corev1.ServiceAccount{}, nil
	case "networking.k8s.io/v1 Ingress":
		return &networkingv1.Ingress{}, nil
	case "autoscaling/v2 HorizontalPodAutoscaler":
		return &autoscalingv2.HorizontalPodAutoscaler{}, nil
	case "policy/v1 PodDisruptionBudget":
		return &policyv1.PodDisruptionBudget{}, nil
	case "monitoring.coreos.com/v1 ServiceMonitor":
		return &monitoringv1.ServiceMonitor{}, nil
	}
	return nil, fmt.Errorf("unexpected %s %s", apiVersion, kind)
}

// render renders the chart as "helm template kp" would, with vals over
// values.yaml, and decodes every manifest strictly: an unknown or
// misplaced field is an error.
func render(t *testing.T, vals map[string]any) (rendered, error) {
	t.Helper()
	chrt, err := loader.Load(chartDir)
	if err != nil {
		t.Fatal(err)
	}
	inst := action.NewInstall(&action.Configuration{Log: func(string, ...any) {}})
	inst.DryRun = true
	inst.ClientOnly = true
	inst.Replace = true
	inst.ReleaseName = "kp"
	inst.Namespace = "keypool"
	rel, err := inst.Run(chrt, vals)
	if err != nil {
		return rendered{}, err
	}
	r := rendered{objects: map[string]any{}, notes: rel.Info.Notes}
	for name, m := range releaseutil.SplitManifests(rel.Manifest) {
		var tm metav1.TypeMeta
		if err := yaml.Unmarshal([]byte(m), &tm); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		obj, err := newObject(tm.APIVersion, tm.Kind)
		if err != nil {
			t.Fatalf("%s: %v\n%s", name, err, m)
		}
		if err := yaml.UnmarshalStrict([]byte(m), obj); err != nil {
			t.Fatalf("%s %s does not decode strictly: %v\n%s", tm.APIVersion, tm.Kind, err, m)
		}
		meta := reflect.ValueOf(obj).Elem().FieldByName("ObjectMeta").Interface().(metav1.ObjectMeta)
		key := tm.Kind + "/" + meta.Name
		if _, dup := r.objects[key]; dup {
			t.Fatalf("%s rendered twice", key)
		}
		r.objects[key] = obj
	}
	return r, nil
}

func mustRender(t *testing.T, vals map[string]any) rendered {
	t.Helper()
	r, err := render(t, vals)
	if err != nil {
		t.Fatalf("render: %v", err)
	}
	return r
}

func envByName(c corev1.Container) map[string]corev1.EnvVar {
	m := map[string]corev1.EnvVar{}
	for _, e := range c.Env {
		m[e.Name] = e
	}
	return m
}

func envNames(c corev1.Container) []string {
	var names []string
	for _, e := range c.Env {
		names = append(names, e.Name)
	}
	return names
}

// checkPod asserts what every rendering must hold: the restricted
// security context, the probes, the port, and /data as the only writable
// mount.
func checkPod(t *testing.T, d *appsv1.Deployment) corev1.Container {
	t.Helper()
	pod := d.Spec.Template.Spec
	if len(pod.Containers) != 1 {
		t.Fatalf("%d containers", len(pod.Containers))
	}
	c := pod.Containers[0]
	psc := pod.SecurityContext
	if psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot || psc.RunAsUser == nil || *psc.RunAsUser == 0 {
		t.Errorf("pod security context does not run as non-root: %+v", psc)
	}
	if psc == nil || psc.SeccompProfile == nil || psc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("pod seccomp profile is not RuntimeDefault: %+v", psc)
	}
	sc := c.SecurityContext
	switch {
	case sc == nil:
		t.Fatal("no container security context")
	case sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot:
		t.Error("container may run as root")
	case sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem:
		t.Error("root filesystem is writable")
	case sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation:
		t.Error("privilege escalation allowed")
	case sc.Capabilities == nil || !reflect.DeepEqual(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) != 0:
		t.Errorf("capabilities %+v, want drop ALL and add none", sc.Capabilities)
	case sc.Privileged != nil && *sc.Privileged:
		t.Error("privileged")
	case sc.SeccompProfile == nil || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault:
		t.Error("container seccomp profile is not RuntimeDefault")
	}
	if pod.AutomountServiceAccountToken == nil || *pod.AutomountServiceAccountToken {
		t.Error("the service account token is mounted; keypoold does not call the Kubernetes API")
	}
	probe := func(name string, p *corev1.Probe, path string) {
		if p == nil || p.HTTPGet == nil || p.HTTPGet.Path != path || p.HTTPGet.Port.String() != "http" {
			t.Errorf("%s probe %+v, want GET %s on port http", name, p, path)
		}
	}
	probe("liveness", c.LivenessProbe, "/healthz")
	probe("readiness", c.ReadinessProbe, "/readyz")
	if len(c.Ports) != 1 || c.Ports[0].Name != "http" || c.Ports[0].ContainerPort != 8080 {
		t.Errorf("ports %+v, want http 8080", c.Ports)
	}
	if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() || c.Resources.Limits.Memory().IsZero() {
		t.Errorf("resources %+v: want cpu and memory requests and a memory limit", c.Resources)
	}
	env := envByName(c)
	if v := env["KEYPOOL_LISTEN"].Value; v != ":8080" {
		t.Errorf("KEYPOOL_LISTEN %q, want :8080 (all interfaces)", v)
	}
	for _, name := range []string{"KEYPOOL_DATA_DIR", "TMPDIR"} {
		if v := env[name].Value; v != "/data" {
			t.Errorf("%s %q, want /data, the only writable path", name, v)
		}
	}
	checkEnvNames(t, "the Deployment", envNames(c), fullExtraEnv)
	writable := 0
	for _, m := range c.VolumeMounts {
		if m.ReadOnly {
			continue
		}
		if m.MountPath != "/data" {
			t.Errorf("writable mount %s: only /data may be writable", m.MountPath)
		}
		writable++
	}
	if writable != 1 {
		t.Errorf("%d writable mounts, want /data", writable)
	}
	if d.Spec.Template.Spec.TerminationGracePeriodSeconds == nil || *d.Spec.Template.Spec.TerminationGracePeriodSeconds <= 30 {
		t.Error("termination grace period does not exceed the 30s drain timeout")
	}
	return c
}

func volume(t *testing.T, d *appsv1.Deployment, name string) corev1.Volume {
	t.Helper()
	for _, v := range d.Spec.Template.Spec.Volumes {
		if v.Name == name {
			return v
		}
	}
	t.Fatalf("no volume %q", name)
	return corev1.Volume{}
}

// secretRef checks that env var name comes from key of secret.
func secretRef(t *testing.T, c corev1.Container, name, secret, key string, optional bool) {
	t.Helper()
	e, ok := envByName(c)[name]
	if !ok || e.ValueFrom == nil || e.ValueFrom.SecretKeyRef == nil {
		t.Errorf("%s is not read from a Secret: %+v", name, e)
		return
	}
	ref := e.ValueFrom.SecretKeyRef
	if ref.Name != secret || ref.Key != key || (ref.Optional != nil && *ref.Optional) != optional {
		t.Errorf("%s from secret %s key %s optional %v, want %s key %s optional %v", name, ref.Name, ref.Key, ref.Optional != nil && *ref.Optional, secret, key, optional)
	}
}

func TestChartDefaults(t *testing.T) {
	r := mustRender(t, nil)
	if got, want := strings.Join(r.kinds(), ","), "Deployment,PersistentVolumeClaim,Secret,Service,ServiceAccount"; got != want {
		t.Errorf("kinds %s, want %s", got, want)
	}
	d := get[*appsv1.Deployment](t, r, "Deployment")
	if d.Name != "kp-keypool" {
		t.Errorf("name %q", d.Name)
	}
	if d.Spec.Replicas == nil || *d.Spec.Replicas != 1 {
		t.Errorf("replicas %v, want 1", d.Spec.Replicas)
	}
	if d.Spec.Strategy.Type != appsv1.RecreateDeploymentStrategyType {
		t.Errorf("strategy %s: a SQLite pod must stop before its successor opens the file", d.Spec.Strategy.Type)
	}
	c := checkPod(t, d)
	if c.Image != "ghcr.io/keypool/keypoold:0.1.0" {
		t.Errorf("image %q, want the appVersion tag", c.Image)
	}
	env := envByName(c)
	if v := env["KEYPOOL_DATABASE"].Value; v != "sqlite:/data/keypool.db" {
		t.Errorf("KEYPOOL_DATABASE %q, want SQLite on the volume", v)
	}
	for _, absent := range []string{"KEYPOOL_REDIS_URL", "KEYPOOL_CONFIG", "KEYPOOL_TRUSTED_PROXIES"} {
		if _, ok := env[absent]; ok {
			t.Errorf("%s set by default", absent)
		}
	}
	// Unset secrets are generated on the PVC by keypoold.
	secretRef(t, c, "KEYPOOL_ADMIN_TOKEN", "kp-keypool", "admin-token", true)
	secretRef(t, c, "KEYPOOL_ENCRYPTION_KEY", "kp-keypool", "encryption-key", true)
	secretRef(t, c, "GOOGLE_CLIENT_ID", "kp-keypool", "google-client-id", true)
	pvc := get[*corev1.PersistentVolumeClaim](t, r, "PersistentVolumeClaim")
	if v := volume(t, d, "data"); v.PersistentVolumeClaim == nil || v.PersistentVolumeClaim.ClaimName != pvc.Name {
		t.Errorf("data volume %+v, want the PVC %s", v, pvc.Name)
	}
	if q := pvc.Spec.Resources.Requests[corev1.ResourceStorage]; q.String() != "1Gi" {
		t.Errorf("PVC size %s", q.String())
	}
	if s := get[*corev1.Secret](t, r, "Secret"); len(s.Data) != 0 {
		t.Errorf("default Secret holds %d keys, want none", len(s.Data))
	}
	svc := get[*corev1.Service](t, r, "Service")
	if len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].TargetPort.String() != "http" || svc.Spec.Ports[0].Port != 80 {
		t.Errorf("service ports %+v", svc.Spec.Ports)
	}
	if !reflect.DeepEqual(svc.Spec.Selector, d.Spec.Selector.MatchLabels) {
		t.Errorf("service selector %v, deployment selector %v", svc.Spec.Selector, d.Spec.Selector.MatchLabels)
	}
	if !strings.Contains(r.notes, "generated one on the volume") {
		t.Errorf("NOTES do not say where the generated admin token is:\n%s", r.notes)
	}
}

const (
	testAdminToken = "admin-3f6c0c1e5d"
	testEncKey     = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
	testDBURL      = "postgres://keypool:pw@pg.example:5432/keypool?sslmode=require"
	testRedisURL   = "redis://:pw@redis.example:6379/0"
	// testStateSecret MACs the sign-in state; every replica needs it.
	testStateSecret = "state-5b1e0c9a7d3f2e8b6a4c1d0e9f8a7b6c"
)

// fullExtraEnv is the variable fullValues passes with extraEnv for its
// config's ${…} key value.
const fullExtraEnv = "OPENAI_KEY_1"

// fullValues turns on every option.
func fullValues() map[string]any {
	return map[string]any{
		"replicaCount": 3,
		"image":        map[string]any{"repository": "registry.example/keypoold", "tag": "v0.1.0", "pullPolicy": "Always"},
		"database":     map[string]any{"type": "postgres", "url": testDBURL},
		"redis":        map[string]any{"url": testRedisURL},
		"secrets": map[string]any{
			"adminToken": testAdminToken, "encryptionKey": testEncKey,
			"googleClientId": "123456789-abc.apps.googleusercontent.com", "googleClientSecret": "GOCSPX-secret",
			"authBaseUrl": "https://proxy.internal", "oidcStateSecret": testStateSecret,
		},
		"ingress": map[string]any{
			"enabled": true, "className": "nginx",
			"annotations": map[string]any{"nginx.ingress.kubernetes.io/proxy-buffering": "off"},
			"hosts":       []any{map[string]any{"host": "keypool.example.com", "paths": []any{map[string]any{"path": "/", "pathType": "Prefix"}}}},
			"tls":         []any{map[string]any{"secretName": "keypool-tls", "hosts": []any{"keypool.example.com"}}},
		},
		"autoscaling":         map[string]any{"enabled": true, "minReplicas": 3, "maxReplicas": 12, "targetCPUUtilizationPercentage": 60, "targetMemoryUtilizationPercentage": 80},
		"podDisruptionBudget": map[string]any{"enabled": true, "minAvailable": 2},
		"serviceMonitor":      map[string]any{"enabled": true, "interval": "15s", "labels": map[string]any{"release": "prometheus"}},
		"log":                 map[string]any{"level": "debug", "format": "text"},
		"trustedProxies":      []any{"10.0.0.0/8", "192.168.1.1"},
		"config": map[string]any{
			"services": []any{map[string]any{"name": "openai", "base_url": "https://api.openai.com", "keys": []any{map[string]any{"key_value": "${" + fullExtraEnv + "}"}}}},
		},
		"extraEnv":                  []any{map[string]any{"name": fullExtraEnv, "valueFrom": map[string]any{"secretKeyRef": map[string]any{"name": "upstream-keys", "key": "openai-1"}}}},
		"podAnnotations":            map[string]any{"example.com/team": "platform"},
		"nodeSelector":              map[string]any{"kubernetes.io/os": "linux"},
		"tolerations":               []any{map[string]any{"key": "dedicated", "operator": "Equal", "value": "proxy", "effect": "NoSchedule"}},
		"topologySpreadConstraints": []any{map[string]any{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": map[string]any{"matchLabels": map[string]any{"app.kubernetes.io/name": "keypool"}}}},
		"service":                   map[string]any{"type": "ClusterIP", "port": 8080},
	}
}

func TestChartFull(t *testing.T) {
	r := mustRender(t, fullValues())
	want := "ConfigMap,Deployment,HorizontalPodAutoscaler,Ingress,PodDisruptionBudget,Secret,Service,ServiceAccount,ServiceMonitor"
	if got := strings.Join(r.kinds(), ","); got != want {
		t.Errorf("kinds %s, want %s", got, want)
	}
	d := get[*appsv1.Deployment](t, r, "Deployment")
	c := checkPod(t, d)
	if d.Spec.Replicas != nil {
		t.Errorf("replicas %d set although the HPA owns them", *d.Spec.Replicas)
	}
	if d.Spec.Strategy.Type != appsv1.RollingUpdateDeploymentStrategyType {
		t.Errorf("strategy %s, want RollingUpdate with PostgreSQL", d.Spec.Strategy.Type)
	}
	if c.Image != "registry.example/keypoold:v0.1.0" || c.ImagePullPolicy != corev1.PullAlways {
		t.Errorf("image %s %s", c.Image, c.ImagePullPolicy)
	}
	if v := volume(t, d, "data"); v.EmptyDir == nil {
		t.Errorf("data volume %+v, want an emptyDir with PostgreSQL", v)
	}

	// Every secret value reaches its variable through the Secret.
	s := get[*corev1.Secret](t, r, "Secret")
	wantData := map[string]string{
		"admin-token": testAdminToken, "encryption-key": testEncKey, "database-url": testDBURL, "redis-url": testRedisURL,
		"google-client-id": "123456789-abc.apps.googleusercontent.com", "google-client-secret": "GOCSPX-secret",
		"auth-base-url": "https://proxy.internal", "oidc-state-secret": testStateSecret,
	}
	got := map[string]string{}
	for k, v := range s.Data {
		got[k] = string(v)
	}
	if !reflect.DeepEqual(got, wantData) {
		t.Errorf("Secret data %v, want %v", got, wantData)
	}
	for _, ref := range []struct {
		env, key string
		optional bool
	}{
		{"KEYPOOL_ADMIN_TOKEN", "admin-token", false},
		{"KEYPOOL_ENCRYPTION_KEY", "encryption-key", false},
		{"KEYPOOL_DATABASE", "database-url", false},
		{"KEYPOOL_REDIS_URL", "redis-url", false},
		{"GOOGLE_CLIENT_ID", "google-client-id", true},
		{"GOOGLE_CLIENT_SECRET", "google-client-secret", true},
		{"AUTH_BASE_URL", "auth-base-url", true},
		{"KEYPOOL_OIDC_STATE_SECRET", "oidc-state-secret", true},
	} {
		secretRef(t, c, ref.env, s.Name, ref.key, ref.optional)
	}
	// No secret value appears in plain text anywhere but the Secret.
	for k, o := range r.objects {
		if strings.HasPrefix(k, "Secret/") {
			continue
		}
		b, _ := yaml.Marshal(o)
		for _, v := range wantData {
			if strings.Contains(string(b), v) {
				t.Errorf("%s contains the secret value %q", k, v)
			}
		}
	}
	env := envByName(c)
	for name, want := range map[string]string{
		"KEYPOOL_LOG_LEVEL": "debug", "KEYPOOL_LOG_FORMAT": "text", "KEYPOOL_DRAIN_TIMEOUT": "30s",
		"KEYPOOL_TRUSTED_PROXIES": "10.0.0.0/8,192.168.1.1", "KEYPOOL_CONFIG": "/etc/keypool/config.yaml",
	} {
		if got := env[name].Value; got != want {
			t.Errorf("%s = %q, want %q", name, got, want)
		}
	}
	if e := env[fullExtraEnv]; e.ValueFrom == nil || e.ValueFrom.SecretKeyRef.Name != "upstream-keys" {
		t.Errorf("extraEnv not passed: %+v", e)
	}

	// The ConfigMap holds the YAML config at the path KEYPOOL_CONFIG names.
	cm := get[*corev1.ConfigMap](t, r, "ConfigMap")
	var cfg map[string]any
	if err := yaml.UnmarshalStrict([]byte(cm.Data["config.yaml"]), &cfg); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(cfg, mustJSONRoundTrip(t, fullValues()["config"])) {
		t.Errorf("config.yaml %v", cfg)
	}
	mounted := false
	for _, m := range c.VolumeMounts {
		if m.MountPath == "/etc/keypool" && m.ReadOnly && volume(t, d, m.Name).ConfigMap != nil && volume(t, d, m.Name).ConfigMap.Name == cm.Name {
			mounted = true
		}
	}
	if !mounted {
		t.Errorf("ConfigMap %s not mounted read-only at /etc/keypool: %+v", cm.Name, c.VolumeMounts)
	}
	if d.Spec.Template.Annotations["checksum/config"] == "" || d.Spec.Template.Annotations["checksum/secret"] == "" {
		t.Error("no checksum annotations: a changed config or secret would not roll the pods")
	}

	svc := get[*corev1.Service](t, r, "Service")
	ing := get[*networkingv1.Ingress](t, r, "Ingress")
	b := ing.Spec.Rules[0].HTTP.Paths[0].Backend.Service
	if b.Name != svc.Name || b.Port.Name != "http" || *ing.Spec.IngressClassName != "nginx" || ing.Spec.TLS[0].SecretName != "keypool-tls" {
		t.Errorf("ingress %+v", ing.Spec)
	}
	hpa := get[*autoscalingv2.HorizontalPodAutoscaler](t, r, "HorizontalPodAutoscaler")
	if hpa.Spec.ScaleTargetRef.Name != d.Name || hpa.Spec.ScaleTargetRef.Kind != "Deployment" || *hpa.Spec.MinReplicas != 3 || hpa.Spec.MaxReplicas != 12 || len(hpa.Spec.Metrics) != 2 {
		t.Errorf("hpa %+v", hpa.Spec)
	}
	pdb := get[*policyv1.PodDisruptionBudget](t, r, "PodDisruptionBudget")
	if pdb.Spec.MinAvailable == nil || pdb.Spec.MinAvailable.IntValue() != 2 || !reflect.DeepEqual(pdb.Spec.Selector.MatchLabels, d.Spec.Selector.MatchLabels) {
		t.Errorf("pdb %+v", pdb.Spec)
	}
	sm := get[*monitoringv1.ServiceMonitor](t, r, "ServiceMonitor")
	if len(sm.Spec.Endpoints) != 1 || sm.Spec.Endpoints[0].Port != svc.Spec.Ports[0].Name || sm.Spec.Endpoints[0].Path != "/metrics" ||
		string(sm.Spec.Endpoints[0].Interval) != "15s" || sm.Labels["release"] != "prometheus" ||
		!subset(sm.Spec.Selector.MatchLabels, svc.Labels) {
		t.Errorf("service monitor %+v labels %v", sm.Spec, sm.Labels)
	}
	for k, v := range d.Spec.Selector.MatchLabels {
		if d.Spec.Template.Labels[k] != v {
			t.Errorf("pod labels %v miss selector %s=%s", d.Spec.Template.Labels, k, v)
		}
	}
}

func subset(small, big map[string]string) bool {
	for k, v := range small {
		if big[k] != v {
			return false
		}
	}
	return true
}

func mustJSONRoundTrip(t *testing.T, v any) map[string]any {
	t.Helper()
	b, err := yaml.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	var out map[string]any
	if err := yaml.Unmarshal(b, &out); err != nil {
		t.Fatal(err)
	}
	return out
}
