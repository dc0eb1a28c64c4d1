"""``ptmserve.ray``'s configuration and the builder ``serve run ptmserve.ray:app`` calls (no Ray instance)."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'ptmserve[ray]'")

from ptmserve.errors import InvalidConfig  # noqa: E402


def test_builder_arguments_override_the_environment() -> None:
    from ptmserve.ray import config_from

    env = {"PTMSERVE_REPO": "/shared/models", "PTMSERVE_REPLICAS": "3", "PTMSERVE_DEVICE_MEMORY": "1GiB"}
    config = config_from({"replicas": "4", "max_batch_inputs": "8"}, env)
    assert (config.repo, config.replicas, config.engine.device_memory) == ("/shared/models", 4, "1GiB")
    assert config.server.max_batch_inputs == 8
    with pytest.raises(InvalidConfig, match="unknown arguments replica"):
        config_from({"replica": "2"}, {})
    with pytest.raises(InvalidConfig, match="replicas='two'"):
        config_from({"replicas": "two"}, {})
    with pytest.raises(InvalidConfig, match="router"):
        config_from({"router": "random"}, {})


def test_serve_run_finds_an_application_builder() -> None:
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application
    from ray.serve.scripts import import_attr

    builder = import_attr("ptmserve.ray:app")
    assert isinstance(call_user_app_builder_with_args_if_necessary(builder, {"repo": "/tmp/x"}), Application)
    assert isinstance(call_user_app_builder_with_args_if_necessary(builder, {"router": "ray"}), Application)
