// Package deploy holds the tests of keypool's deployment files: the Helm
// chart under helm/keypool, compose.yaml, the Dockerfile and build.sh. It
// is a module of its own so that Helm, the Kubernetes API types and
// compose-go stay out of the dependencies of github.com/keypool/keypool.
//
//	cd deploy && go test ./...
package deploy
