"""Test infrastructure: a real Kubernetes control plane from Go modules and a process kubelet."""
