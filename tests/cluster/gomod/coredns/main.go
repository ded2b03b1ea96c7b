// Command coredns is CoreDNS v1.15.0 built with only the plugins the test cluster's DNS uses
// (CoreDNS' documented way of choosing plugins at compile time): the kubernetes plugin, which
// serves the Services and EndpointSlices of the test control plane, plus bind, errors, log,
// ready and loadbalance. None of the cloud SDKs of the full build are compiled in.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

// The order in which the plugins see a query (a subset of CoreDNS' plugin.cfg, in its order).
var directives = []string{"bind", "ready", "log", "errors", "loadbalance", "kubernetes"}

func init() { dnsserver.Directives = directives }

func main() { coremain.Run() }
