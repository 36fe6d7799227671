"""The test suite: a package, so that tests.helpers and cni_bridge import without sys.path patching."""
