//go:build tools

// Package tools keeps Kueue's manager command in this module's graph so that `go mod tidy`
// records every module it needs in go.sum; build.py builds it with
// `go build sigs.k8s.io/kueue/cmd/kueue`.
package tools

import _ "sigs.k8s.io/kueue/cmd/kueue"
