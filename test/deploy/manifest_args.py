#!/usr/bin/env python3
"""Prints, one per line, the arguments a rendered manifest gives one of our binaries, rewritten
to run outside Kubernetes under a root directory: every path is followed through the
container's volumeMounts to its volume, then placed under ROOT (hostPath volumes at
ROOT/<host path>, emptyDir at ROOT/emptydir/<workload>/<volume>, secrets at
ROOT/secret/<secret name>), and each $(VAR) is replaced by VAR=VALUE given on the command line.
Also creates the directories a kubelet would (hostPath DirectoryOrCreate/Directory, emptyDir).

  manifest_args.py MANIFEST.yaml BINARY ROOT [VAR=VALUE...]
  manifest_args.py --storageclass NAME MANIFEST.yaml      (its parameters, KEY=VALUE per line)
  manifest_args.py --vac NAME MANIFEST.yaml               (a VolumeAttributesClass's parameters)
  manifest_args.py --secrets SECRETS.yaml ROOT            (writes ROOT/secret/<name>/<key>)
"""
import base64
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_manifests import binary_of, pods_of, resolve, yaml  # noqa: E402


def load(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def place(root, where, pod, kind_path):
    kind, p = kind_path
    if kind == "host":
        return os.path.join(root, p.lstrip("/"))
    if kind.startswith("emptyDir:"):
        return os.path.join(root, "emptydir", where.replace("/", "_"), kind.split(":", 1)[1], p)
    if kind.startswith("volume:"):
        vol = next(v for v in pod["volumes"] if v["name"] == kind.split(":", 1)[1])
        if "secret" in vol:
            return os.path.join(root, "secret", vol["secret"]["secretName"], p)
    raise SystemExit(f"manifest_args: cannot place {kind_path} of {where}")


def args_for(docs, binary, root, subst):
    for where, _, pod in pods_of(docs):
        for c in pod["containers"]:
            if binary_of(c) != binary:
                continue
            for v in pod.get("volumes", []):
                hp = v.get("hostPath")
                if hp and hp.get("type") in ("DirectoryOrCreate", "Directory"):
                    os.makedirs(os.path.join(root, hp["path"].lstrip("/")), exist_ok=True)
                if "emptyDir" in v:
                    os.makedirs(place(root, where, pod, ("emptyDir:" + v["name"], "")), exist_ok=True)
            out = []
            for a in c.get("args", []):
                a = re.sub(r"\$\((\w+)\)", lambda m: subst[m.group(1)], a)
                m = re.fullmatch(r"(--[\w-]+=)(unix://)?(/.*)", a)
                if m:
                    a = m.group(1) + (m.group(2) or "") + place(root, where, pod, resolve(pod, c, m.group(3)))
                out.append(a)
            return out
    raise SystemExit(f"manifest_args: no container runs {binary}")


def main(argv):
    if argv[1] in ("--storageclass", "--vac"):
        kind = "StorageClass" if argv[1] == "--storageclass" else "VolumeAttributesClass"
        for d in load(argv[3]):
            if d.get("kind") == kind and d["metadata"]["name"] == argv[2]:
                for k, v in (d.get("parameters") or {}).items():
                    print(f"{k}={v}")
                return 0
        raise SystemExit(f"manifest_args: no {kind} {argv[2]}")
    if argv[1] == "--secrets":
        for d in load(argv[2]):
            if d.get("kind") != "Secret":
                continue
            d_dir = os.path.join(argv[3], "secret", d["metadata"]["name"])
            os.makedirs(d_dir, exist_ok=True)
            for k, v in d["data"].items():
                fd = os.open(os.path.join(d_dir, k), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(base64.b64decode(v))
        return 0
    manifest, binary, root = argv[1:4]
    subst = dict(kv.split("=", 1) for kv in argv[4:])
    for a in args_for(load(manifest), binary, root, subst):
        print(a)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
