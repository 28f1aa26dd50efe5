"""pytest-boxlite: run tests in microVMs. The plugin is `pytest_boxlite.plugin` (entry point `boxlite`);
`vmm` is the runtime."""
