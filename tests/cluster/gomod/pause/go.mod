// The pause program of the test node's sandbox image (registry.k8s.io/pause cannot be pulled here).
module kubetune.test/cluster/pause

go 1.24.0
