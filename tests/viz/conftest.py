from tests.viz.fixtures import tiny_domain, tiny_model  # noqa: F401  (fixtures)
