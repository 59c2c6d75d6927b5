"""The CI templates (kit/templates/ci/) stay valid YAML and scale out the same way: a matrix
of shards that together check every flow once, each running the gate on its flows, and a job
that merges the shards' reports into one verdict whatever the shards found."""

from __future__ import annotations

from pathlib import Path

import yaml

from kit.starter.config import FLOWS

TEMPLATES = Path(__file__).resolve().parent.parent / "kit" / "templates" / "ci"


def _shards(values: list[str]) -> list[str]:
    flows = [flow for value in values for flow in value.split(",")]
    assert sorted(flows) == sorted(FLOWS), values  # every flow, none in two shards
    return flows


def test_github_actions_runs_a_matrix_of_flow_shards_and_merges_them():
    doc = yaml.safe_load((TEMPLATES / "github-actions.yml").read_text())
    shard, merge = doc["jobs"]["conformance"], doc["jobs"]["merge"]
    matrix = shard["strategy"]["matrix"]
    _shards(matrix["flows"])
    assert matrix["runner"] and shard["runs-on"] == "${{ matrix.runner }}"
    assert shard["strategy"]["fail-fast"] is False
    runs = "\n".join(step.get("run", "") for step in shard["steps"])
    assert "conformance gate --engine" in runs and '--flow "${{ matrix.flows }}"' in runs
    assert " -n " not in runs  # xdist is slower on 2-core runners
    upload = next(s for s in shard["steps"] if s.get("uses", "").startswith("actions/upload"))
    assert "${{ strategy.job-index }}" in upload["with"]["name"] and upload["if"] == "always()"
    assert merge["needs"] == "conformance" and merge["if"] == "always()"
    download = next(
        s for s in merge["steps"] if s.get("uses", "").startswith("actions/download-artifact")
    )
    assert download["with"]["pattern"] == upload["with"]["name"].split("$")[0] + "*"
    merged = "\n".join(step.get("run", "") for step in merge["steps"])
    assert f"report --merge {download['with']['path']}/*/conformance.json" in merged


def test_gitlab_runs_a_parallel_matrix_of_flow_shards_and_merges_them():
    doc = yaml.safe_load((TEMPLATES / "gitlab-ci.yml").read_text())
    shard, merge = doc["conformance"], doc["conformance-merge"]
    (matrix,) = shard["parallel"]["matrix"]
    _shards(matrix["FLOWS"])
    assert matrix["IMAGE"] and shard["image"] == "$IMAGE"
    script = "\n".join(shard["script"])
    assert "conformance gate --engine" in script and '--flow "$FLOWS"' in script
    assert " -n " not in script
    assert "shards/" in shard["artifacts"]["paths"] and shard["artifacts"]["when"] == "always"
    assert 'shards/$CI_JOB_ID.json' in "\n".join(shard["after_script"])
    assert merge["needs"] == ["conformance"] and merge["when"] == "always"
    assert "report --merge shards/*.json" in "\n".join(merge["script"])
