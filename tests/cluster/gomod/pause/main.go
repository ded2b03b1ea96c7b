// Command pause holds a pod's namespaces open, as registry.k8s.io/pause does: it sleeps until
// SIGTERM or SIGINT, then exits 0. Pods here never share a PID namespace, so it reaps nothing.
// Built static (CGO_ENABLED=0) into the test node's sandbox image.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
}
