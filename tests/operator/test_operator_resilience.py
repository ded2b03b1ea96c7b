"""Reconcile decisions for what a tenant (or the cluster) can do to a FineTuneJob's children:
names taken by objects it does not own, pods the Job controller cannot create, and Jobs named
by an operator from before the collision-free names (upgrade). No API server here; the e2e
twin is tests/e2e/test_tenant_resilience.py."""

from __future__ import annotations

from operator_builders import NOW, UID, ftj, k8s_job, pod

from kubetune.operator import manifests as m
from kubetune.operator import status as s
from kubetune.operator.reconcile import Observed, reconcile, stage_names

QUOTA = ('Error creating: pods "llama-sft-0-x" is forbidden: failed quota: q: must specify limits.cpu '
         'for: trainer')


def verbs(d):
    return [(a.verb, a.kind, a.name) for a in d.actions]


def running(d):
    return s.get_condition(d.status["conditions"], "Running")


def failed_create(job_name: str, uid: str = "job-uid-1", message: str = QUOTA, at: str = "2025-06-01T12:00:05Z"):
    return {"involvedObject": {"kind": "Job", "name": job_name, "uid": uid}, "reason": "FailedCreate",
            "message": message, "lastTimestamp": at}


def test_a_name_taken_by_an_object_not_owned_is_a_name_conflict_not_success(config):
    taken = "Job llama-sft already exists and is not owned by this FineTuneJob (owned by no owner)"
    d = reconcile(ftj(), Observed(conflicts={"llama-sft": taken}), config, now=NOW)
    assert d.status["phase"] == "Pending" and not d.actions
    assert running(d)["reason"] == "NameConflict" and taken in running(d)["message"]
    assert [e.reason for e in d.events] == ["NameConflict"]
    # the same conflict on the next reconcile: the condition stays, no second event
    again = reconcile(ftj(status=d.status), Observed(conflicts={"llama-sft": taken}), config, now=NOW)
    assert running(again)["reason"] == "NameConflict" and not again.events


def test_pods_that_cannot_be_created_show_the_failed_create_event(config):
    obs = Observed(jobs={"llama-sft": k8s_job("llama-sft")}, configmaps={},
                   job_events={"llama-sft": [failed_create("llama-sft", at="2025-06-01T12:00:01Z", message="old"),
                                             failed_create("llama-sft")]})
    d = reconcile(ftj(), obs, config, now=NOW)
    assert d.status["phase"] == "Pending"
    assert running(d)["reason"] == "PodCreationFailed" and "must specify limits.cpu" in running(d)["message"]
    assert "PodCreationFailed" in [e.reason for e in d.events]
    # an event of an earlier Job of that name (another uid) is not this Job's problem
    stale = Observed(jobs={"llama-sft": k8s_job("llama-sft")},
                     job_events={"llama-sft": [failed_create("llama-sft", uid="older-job")]})
    assert running(reconcile(ftj(), stale, config, now=NOW))["reason"] == "Pending"
    # once a pod exists (the cause was fixed), its own state speaks
    fixed = Observed(jobs={"llama-sft": k8s_job("llama-sft", active=1)}, pods={"llama-sft": [pod("llama-sft", "Running")]},
                     job_events={"llama-sft": [failed_create("llama-sft")]})
    assert reconcile(ftj(), fixed, config, now=NOW).status["phase"] == "Running"


def test_a_stage_job_named_by_the_old_scheme_is_kept_across_the_upgrade(config):
    """A FineTuneJob running stage `my-sft` under the old operator has Job `llama-my-sft`; the
    new name would be `llama-my-sft-<hash>`. The new operator keeps using the old Job (and its
    ConfigMap), deletes nothing, creates no second Job; the next stage gets a new-style name."""
    stages = [{"name": "my-sft", "type": "sft"}, {"name": "dpo", "type": "dpo"}]
    old, new = m.legacy_child_name("llama", "my-sft"), m.child_name("llama", "my-sft")
    assert old == "llama-my-sft" != new
    body = ftj(stages=stages)
    d0 = reconcile(body, Observed(), config, now=NOW)  # what the ConfigMap looks like
    cm = next(a.body for a in d0.actions if a.kind == "ConfigMap")
    cm = {**cm, "metadata": {**cm["metadata"], "name": old}}
    obs = Observed(jobs={old: k8s_job(old, active=1)}, configmaps={old: cm}, pods={old: [pod(old, "Running")]})
    assert stage_names(obs, "llama", "my-sft", UID) == (old, old)
    d = reconcile(body, obs, config, now=NOW)
    assert d.status["phase"] == "Running" and not d.actions, verbs(d)
    # a Job of that old name owned by someone else is not ours to continue
    foreign = Observed(jobs={old: k8s_job(old, owned=False)})
    assert stage_names(foreign, "llama", "my-sft", UID) == (new, m.service_name("llama", "my-sft"))
    # the old stage completes: the next stage is created under the new scheme
    done = Observed(jobs={old: k8s_job(old, conditions=[("Complete", "")], completion_time="2025-06-01T12:04:00Z")},
                    configmaps={old: cm})
    d = reconcile(body, done, config, now=NOW)
    assert ("create", "Job", "llama-dpo") in verbs(d) and not [v for v in verbs(d) if v[0] == "delete"]


def test_observe_reads_failed_create_events_and_survives_a_chart_without_list_events(monkeypatch):
    """kube.observe with the API calls replaced (a mock: the e2e test reads the real events)."""
    from kubernetes.client.rest import ApiException

    from kubetune.operator import kube

    job = k8s_job("llama-sft")
    ev = failed_create("llama-sft")
    answers = {"list_namespaced_job": [job], "list_namespaced_config_map": [], "list_namespaced_service": [],
               "list_namespaced_pod": [], "list_namespaced_network_policy": [], "list_namespaced_event": [ev]}
    monkeypatch.setattr(kube, "_json", lambda call, *a, **kw: {"items": answers[call.__name__]})
    monkeypatch.setattr(kube, "api_client", lambda: None)
    assert kube.observe("ml", "llama").job_events == {"llama-sft": [ev]}

    def forbidden(call, *a, **kw):
        if call.__name__ == "list_namespaced_event":
            raise ApiException(status=403, reason="Forbidden")
        return {"items": answers[call.__name__]}

    monkeypatch.setattr(kube, "_json", forbidden)
    assert kube.observe("ml", "llama").job_events == {}
