"""The cluster tier's fixtures (kube and namespace come from tests.kube, for the whole suite)."""

from .test_operator_fixtures import (  # noqa: F401 - fixtures
    crds_fixture,
    operator_factory_fixture,
    operator_fixture,
    pvc_fixture,
)
