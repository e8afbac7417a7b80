#!/usr/bin/env python3
"""Invariants of engram's rendered manifests that the Kubernetes schemas cannot check.

    check.py RENDERED.yaml... --bin DIR --docs README.md [--docs deploy/README.md]

For every rendered overlay:

1. every container of a Deployment or StatefulSet has liveness and readiness probes, CPU and
   memory requests and limits, runs as non-root, cannot escalate privileges, drops all
   capabilities and has a read-only root filesystem;
2. every port an engram service listens on (its containerPorts) is exposed by a Service that
   selects it and admitted by a NetworkPolicy that selects it, and a default-deny policy exists;
3. the environment each engram container gets (the ConfigMap and the container's own `env`) is
   exactly what its binary accepts: every variable is one the binary reads (from its `--help`),
   and the binary, started with that environment and `--check-config`, says it is valid.

And once: every ENGRAM_* variable any binary reads is documented (in one of the --docs files).

`--self-test` checks the checker: it removes a probe, a limit, a policy, and adds an unknown
variable, and expects each to be reported.
"""

import argparse
import copy
import os
import re
import subprocess
import sys

import yaml

SERVICES = ["gateway", "retrieval", "ingestion", "embedding"]
WORKLOADS = ("Deployment", "StatefulSet")


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def name(doc):
    return f"{doc['kind']}/{doc['metadata']['name']}"


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def check_workloads(docs):
    problems = []
    for doc in docs:
        if doc["kind"] not in WORKLOADS:
            continue
        pod = doc["spec"]["template"]["spec"]
        pod_sc = pod.get("securityContext", {})
        for c in pod.get("containers", []):
            where = f"{name(doc)} container {c['name']}"
            for probe in ("livenessProbe", "readinessProbe"):
                if probe not in c:
                    problems.append(f"{where}: no {probe}")
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in res.get(kind, {}):
                        problems.append(f"{where}: no {r} {kind[:-1]}")
            sc = c.get("securityContext", {})
            non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
            if non_root is not True:
                problems.append(f"{where}: not runAsNonRoot")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: root filesystem is not read-only")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                problems.append(f"{where}: capabilities not all dropped")
    return problems


def check_ports(docs):
    problems = []
    services = [d for d in docs if d["kind"] == "Service"]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    if not any(p["spec"].get("podSelector") == {} and "Ingress" in p["spec"].get("policyTypes", [])
               and not p["spec"].get("ingress") for p in policies):
        problems.append("no default-deny ingress NetworkPolicy")
    for doc in docs:
        if doc["kind"] not in WORKLOADS:
            continue
        labels = doc["spec"]["template"]["metadata"].get("labels", {})
        for c in doc["spec"]["template"]["spec"]["containers"]:
            for port in c.get("ports", []):
                number, pname = port["containerPort"], port.get("name")
                where = f"{name(doc)} port {number}"
                exposed = any(
                    selects(s["spec"].get("selector"), labels)
                    and any(p.get("targetPort") in (number, pname) or (p.get("targetPort") is None and p["port"] == number)
                            for p in s["spec"].get("ports", []))
                    for s in services)
                if not exposed:
                    problems.append(f"{where}: no Service exposes it")
                admitted = any(
                    selects(p["spec"]["podSelector"].get("matchLabels"), labels)
                    and any(any(q.get("port") in (number, pname) for q in rule.get("ports", []))
                            for rule in p["spec"].get("ingress", []))
                    for p in policies)
                if not admitted:
                    problems.append(f"{where}: no NetworkPolicy admits it")
    return problems


def env_of(docs, doc, container):
    """The environment a container starts with: its ConfigMaps, then its literal env."""
    env = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if not ref:
            continue
        for d in docs:
            if d["kind"] == "ConfigMap" and d["metadata"]["name"] == ref["name"]:
                env.update(d.get("data", {}))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in var.get("valueFrom", {}):
            # A Secret's value is the operator's: stand in a well-formed one.
            env[var["name"]] = "0" * 64
    return env


def binary_vars(binary):
    out = subprocess.run([binary, "--help"], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"\[env: (ENGRAM_[A-Z0-9_]+)", out))


def check_config(docs, bin_dir, known):
    problems = []
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        for c in doc["spec"]["template"]["spec"]["containers"]:
            service = c["name"]
            if service not in SERVICES:
                continue
            binary = os.path.join(bin_dir, f"engram-{service}")
            env = env_of(docs, doc, c)
            where = f"{name(doc)}"
            for var in sorted(env):
                if var.startswith("ENGRAM_") and var not in known[service]:
                    problems.append(f"{where}: engram-{service} does not read {var}")
            clean = {k: v for k, v in os.environ.items() if not k.startswith("ENGRAM_")}
            run = subprocess.run([binary, "--check-config"], env={**clean, **env},
                                 capture_output=True, text=True)
            if run.returncode != 0:
                problems.append(f"{where}: engram-{service} refuses its configuration: {run.stderr.strip()}")
    return problems


def check_documented(known, docs_files):
    text = "".join(open(f).read() for f in docs_files)
    every = set().union(*known.values())
    return [f"{var} is read by a binary but documented in none of {', '.join(docs_files)}"
            for var in sorted(every) if var not in text]


def check_all(rendered, bin_dir, known):
    problems = []
    for path, docs in rendered.items():
        for p in check_workloads(docs) + check_ports(docs) + check_config(docs, bin_dir, known):
            problems.append(f"{path}: {p}")
    return problems


def self_test(rendered, bin_dir, known):
    path, docs = next(iter(rendered.items()))
    mutations = []

    def gateway(docs):
        return next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "engram-gateway")

    def no_probe(docs):
        del gateway(docs)["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]
    mutations.append(("a removed liveness probe", no_probe, "no livenessProbe"))

    def no_limit(docs):
        del gateway(docs)["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    mutations.append(("a removed memory limit", no_limit, "no memory limit"))

    def no_policy(docs):
        docs[:] = [d for d in docs if not (d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "engram-retrieval")]
    mutations.append(("a removed NetworkPolicy", no_policy, "port 50052: no NetworkPolicy admits it"))

    def writable(docs):
        gateway(docs)["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    mutations.append(("a writable root filesystem", writable, "root filesystem is not read-only"))

    def unknown_var(docs):
        gateway(docs)["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "ENGRAM_NO_SUCH_SETTING", "value": "1"})
    mutations.append(("an unknown variable", unknown_var, "does not read ENGRAM_NO_SUCH_SETTING"))

    def bad_value(docs):
        gateway(docs)["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "ENGRAM_DEFAULT_DEADLINE", "value": "soon"})
    mutations.append(("a value the binary refuses", bad_value, "refuses its configuration"))

    failures = []
    for what, mutate, expected in mutations:
        mutated = copy.deepcopy(docs)
        mutate(mutated)
        problems = check_all({path: mutated}, bin_dir, known)
        if not any(expected in p for p in problems):
            failures.append(f"self-test: {what} was not reported (expected {expected!r}; got {problems})")
    return failures


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("rendered", nargs="+")
    parser.add_argument("--bin", required=True)
    parser.add_argument("--docs", action="append", required=True)
    parser.add_argument("--self-test", action="store_true")
    args = parser.parse_args()
    rendered = {path: load(path) for path in args.rendered}
    known = {s: binary_vars(os.path.join(args.bin, f"engram-{s}")) for s in SERVICES}
    problems = check_all(rendered, args.bin, known) + check_documented(known, args.docs)
    if args.self_test:
        problems += self_test(rendered, args.bin, known)
    for p in problems:
        print(f"deploy check: {p}", file=sys.stderr)
    if problems:
        return 1
    print(f"deploy check: {len(rendered)} overlays hold every invariant"
          + (" (and the checker catches what it should)" if args.self_test else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
