"""hps_core.repository: which file serves a version, config.pbtxt parameters read without
Triton, and the staged mirror of a repository for a machine without GPU."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hps_core.repository import (
    SOURCE_MARKER,
    hps_models,
    pbtxt_string_parameter,
    rewrite_instance_groups_to_cpu,
    served_file,
    stage_model_repository,
    sync_model_repository,
    version_numbers,
)
from tests.hps_core.test_serving import _write_model


def test_the_served_file_is_the_versions_own_else_the_parameter_else_the_default(tmp_path: Path) -> None:
    model = tmp_path / "repo" / "emb"
    (model / "2").mkdir(parents=True)
    (model / "3").mkdir()
    (model / "3" / "hps.json").write_text("{}")
    assert served_file(model, 3, "hps.json", "../shared.json") == model / "3" / "hps.json"
    assert served_file(model, "2", "hps.json", "../shared.json") == tmp_path / "repo" / "shared.json"
    assert served_file(model, 2, "hps.json", None, "/etc/hps.json") == Path("/etc/hps.json")
    assert served_file(model, None, "hps.json", None) is None
    assert version_numbers(model) == [2, 3]


def test_pbtxt_parameters_and_hps_models_are_read_as_triton_hands_them_over(tmp_path: Path) -> None:
    text = ('name: "emb"\nbackend: "hps"\nparameters: { key: "hps_config" value: { string_value: " hps.json " } }\n'
            'parameters [{ key: "hps_model"\n value: { string_value: "" } }]\n')
    assert pbtxt_string_parameter(text, "hps_config") == "hps.json"
    assert pbtxt_string_parameter(text, "hps_model") is None  # empty: absent, as the backend reads it
    assert pbtxt_string_parameter(text, "dense_weights") is None
    (tmp_path / "emb").mkdir()
    (tmp_path / "emb" / "config.pbtxt").write_text(text)
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "config.pbtxt").write_text('name: "dense"\nbackend: "dlrm"\n')
    assert [folder.name for folder, _ in hps_models(tmp_path)] == ["emb"]


@pytest.mark.parametrize(
    "text",
    [
        "instance_group [{ kind: KIND_GPU, gpus: [0, 1] }]",
        "instance_group [\n  {\n    count: 2\n    kind: KIND_GPU\n    gpus: [ 0 ]\n  }\n]",
        "instance_group [{ gpus: [0] kind:KIND_GPU }]",
    ],
)
def test_rewrite_gpu_instance_groups(text: str) -> None:
    new, changed = rewrite_instance_groups_to_cpu(text)
    assert changed
    assert "KIND_CPU" in new and "KIND_GPU" not in new and "gpus" not in new


def test_rewrite_leaves_cpu_configs_alone() -> None:
    text = 'backend: "python"\ninstance_group [{ kind: KIND_CPU }]'
    assert rewrite_instance_groups_to_cpu(text) == (text, False)


def test_stage_model_repository_keeps_relative_paths(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _write_model(repo, "gpu_model", "python", "KIND_GPU", "# model")
    _write_model(repo, "cpu_model", "python", "KIND_CPU", "# model")
    (repo / "hps.json").write_text("{}")
    staged, rewritten = stage_model_repository(repo, tmp_path / "staged")
    assert rewritten == ["gpu_model"]
    assert "KIND_CPU" in (staged / "gpu_model" / "config.pbtxt").read_text()
    assert (staged / "gpu_model" / "1" / "model.py").read_text() == "# model"
    assert (staged / "gpu_model" / ".." / "hps.json").read_text() == "{}"
    assert (staged / "gpu_model" / SOURCE_MARKER).read_text().strip() == str((repo / "gpu_model").resolve())
    assert (staged / "cpu_model" / "config.pbtxt").read_text() == (repo / "cpu_model" / "config.pbtxt").read_text()
    # The original is untouched.
    assert "KIND_GPU" in (repo / "gpu_model" / "config.pbtxt").read_text()


def test_sync_model_repository_follows_versions_and_models_added_and_removed(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _write_model(repo, "gpu_model", "python", "KIND_GPU", "# v1")
    staged, _ = stage_model_repository(repo, tmp_path / "staged")
    (repo / "gpu_model" / "2").mkdir()
    (repo / "gpu_model" / "2" / "model.py").write_text("# v2")
    _write_model(repo, "new_model", "python", "KIND_GPU", "# new")
    sync_model_repository(repo, staged)
    assert (staged / "gpu_model" / "2" / "model.py").read_text() == "# v2"
    assert "KIND_CPU" in (staged / "new_model" / "config.pbtxt").read_text()
    assert (staged / "new_model" / "1" / "model.py").read_text() == "# new"
    # A version folder and a model removed from the original go from the mirror too.
    shutil.rmtree(repo / "gpu_model" / "1")
    shutil.rmtree(repo / "new_model")
    config = (repo / "gpu_model" / "config.pbtxt")
    config.write_text(config.read_text() + "\n# changed\n")
    sync_model_repository(repo, staged)
    assert sorted(p.name for p in (staged / "gpu_model").iterdir()) == [SOURCE_MARKER, "2", "config.pbtxt"]
    assert not (staged / "new_model").exists()
    assert "# changed" in (staged / "gpu_model" / "config.pbtxt").read_text()
    assert "KIND_GPU" not in (staged / "gpu_model" / "config.pbtxt").read_text()


def test_stage_model_repository_without_gpu_models_returns_original(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _write_model(repo, "cpu_model", "python", "KIND_CPU", "# model")
    assert stage_model_repository(repo, tmp_path / "staged") == (repo, [])
    assert not (tmp_path / "staged").exists()
