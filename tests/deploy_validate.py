"""Validates deploy/ with real validators (run by tests/tests/deploy.rs).

- Kubernetes objects (DaemonSet, RBAC, CRDs, example pods): kubernetes-validate, strict.
- Custom resources (aad-pod-identity examples, ours and upstream's): jsonschema against the
  openAPIV3Schema of our generated CRDs.
Usage: deploy_validate.py k8s FILE... | cr CRD_DIR FILE...
Prints one JSON object per file: {"file": ..., "ok": bool, "errors": [...]}.
"""
import json
import sys

import jsonschema
import kubernetes_validate
import yaml


def documents(name):
    """The non-empty YAML documents of a file."""
    with open(name) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def k8s(files):
    for name in files:
        errors = []
        for doc in documents(name):
            try:
                kubernetes_validate.validate(doc, "1.37", strict=True)
            except Exception as e:  # ValidationError, InvalidSchemaError, …
                errors.append(f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}: {e}")
        print(json.dumps({"file": name, "ok": not errors, "errors": errors}))


def cr(crd_dir, files):
    import glob

    schemas = {}
    for path in glob.glob(f"{crd_dir}/*.yaml"):
        with open(path) as f:
            crd = yaml.safe_load(f)
        version = crd["spec"]["versions"][0]
        schemas[(crd["spec"]["group"] + "/" + version["name"], crd["spec"]["names"]["kind"])] = version["schema"]["openAPIV3Schema"]
    for name in files:
        errors = []
        for doc in documents(name):
            schema = schemas.get((doc.get("apiVersion"), doc.get("kind")))
            if schema is None:
                continue  # not one of our kinds (e.g. a Pod): kubernetes-validate's job
            for error in jsonschema.Draft7Validator(schema).iter_errors(doc):
                errors.append(f"{doc['kind']}/{doc['metadata'].get('name')}: {error.message} at {list(error.path)}")
        print(json.dumps({"file": name, "ok": not errors, "errors": errors}))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "k8s":
        k8s(sys.argv[2:])
    elif mode == "cr":
        cr(sys.argv[2], sys.argv[3:])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
