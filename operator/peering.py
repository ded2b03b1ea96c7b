"""kopf peering: the objects that let several operator replicas agree that only one acts.

Each replica registers in a peering object with a priority (random unless `--priority` is
given); the replica with the highest priority works, the others pause until it stops renewing
its record (60 s). Replicas with equal priorities all pause, so two never act at once.
The CRDs and the peering objects below must exist in the cluster (the Helm chart installs
them; `kubetune operator --print-peering-manifests | kubectl apply -f -` does it by hand);
until they do, a replica started without `--standalone` waits and does nothing.
"""

from __future__ import annotations

from typing import Any

import yaml

_SCHEMA = {
    "openAPIV3Schema": {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {"status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    }
}


def _crd(kind: str, plural: str, scope: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.kopf.dev"},
        "spec": {
            "scope": scope,
            "group": "kopf.dev",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "versions": [{"name": "v1", "served": True, "storage": True, "schema": _SCHEMA}],
        },
    }


def peering_manifests(name: str = "kubetune", namespaces: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The kopf peering CRDs and the peering object(s) for `name`: one ClusterKopfPeering for a
    cluster-wide operator, one KopfPeering per watched namespace otherwise."""
    out = [_crd("ClusterKopfPeering", "clusterkopfpeerings", "Cluster"),
           _crd("KopfPeering", "kopfpeerings", "Namespaced")]
    if namespaces:
        out += [{"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": name, "namespace": ns}}
                for ns in namespaces]
    else:
        out.append({"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": name}})
    return out


def peering_yaml(name: str = "kubetune", namespaces: tuple[str, ...] = ()) -> str:
    return yaml.safe_dump_all(peering_manifests(name, namespaces), sort_keys=False)
