"""The front doors: offline LLM, the Serve app over HTTP, the CLI. A package so that its Serve instance
(tests/cluster/conftest.py, package-scoped) is torn down before other directories tests need Rays CPUs."""
