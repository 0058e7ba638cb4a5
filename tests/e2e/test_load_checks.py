"""Load-time checks in a real Triton: an HPS model whose config.pbtxt is not HugeCTR's
interface fails to load, and the reason (model, field, found, expected, fix) reaches the log."""

from __future__ import annotations

from pathlib import Path

import pytest

from hps_core.errors import ServingError
from hps_core.serving import TritonServer
from tests.e2e.models import HUGECTR_STYLE_CONFIG, E2EModels

pytestmark = pytest.mark.triton

BAD_CONFIGS = {
    # model name: (change to the HugeCTR-style config, words the load error must hold)
    "bad_output_dims": (
        ('{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] }', '{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 24 ] }'),
        "model 'bad_output_dims': config.pbtxt output[0].dims (OUTPUT0) is [24]",
    ),
    "bad_keys_type": (
        ('{ name: "KEYS" data_type: TYPE_INT64 dims: [ -1 ] }', '{ name: "KEYS" data_type: TYPE_FP32 dims: [ -1 ] }'),
        "model 'bad_keys_type': config.pbtxt input[0].data_type (KEYS) is TYPE_FP32",
    ),
}


@pytest.mark.timeout(180)
def test_a_config_that_is_not_hugectrs_interface_fails_to_load_naming_the_field(
    tmp_path: Path, e2e_models: E2EModels
) -> None:
    repository = tmp_path / "repository"
    for name, ((old, new), _) in BAD_CONFIGS.items():
        assert old in HUGECTR_STYLE_CONFIG
        (repository / name / "1").mkdir(parents=True)
        config = HUGECTR_STYLE_CONFIG.replace('name: "hps_multi"', f'name: "{name}"').replace(old, new)
        (repository / name / "config.pbtxt").write_text(config + 'parameters: { key: "hps_model" value: { string_value: "hps_multi" } }\n')
    server = TritonServer(repository, http_port=0, grpc_port=0, metrics_port=0, exit_timeout=2,
                          backend_config=[f"hps,ps={e2e_models.hps_json}"])
    with pytest.raises(ServingError) as info:
        server.start()
    message = str(info.value)
    for _, words in BAD_CONFIGS.values():
        assert words in message, message
    assert "set `dims: [ -1 ]`" in message and "set `data_type: TYPE_INT64`" in message
