package server_test

import (
	"strings"
	"testing"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/server"
)

// Rotating the encryption key: start with KEYPOOL_ENCRYPTION_KEY=new,old,
// keypoold re-seals every stored key online; afterwards the new key alone
// opens the database and the keys still serve.
func TestEncryptionKeyRotation(t *testing.T) {
	const newKey = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100"
	up := newUpstream(t, okJSON)
	var db server.SecretURL
	k1 := startKP(t, func(c *server.Config) { db = c.Database })
	tok, _ := setup(t, k1, up, nil, keyA)
	if err := k1.stop(); err != nil {
		t.Fatal(err)
	}

	k2 := startKP(t, func(c *server.Config) {
		c.Database = db
		c.EncryptionKey = keypool.Secret(newKey + "," + testEncKey)
	})
	eventually(t, "the rewrap log line", func() bool { return strings.Contains(k2.logs.String(), "re-sealed with the current encryption key") })
	if err := k2.stop(); err != nil {
		t.Fatal(err)
	}

	k3 := startKP(t, func(c *server.Config) {
		c.Database = db
		c.EncryptionKey = keypool.Secret(newKey)
	})
	if code, m, _ := k3.do("GET", "/v1/openai/v1/models", tok, nil); code != 200 {
		t.Fatalf("after rotation: %d %v", code, m)
	}
	if bearerKey(up.last().Header) != keyA {
		t.Fatal("upstream did not get the re-sealed key")
	}
}
