"""pytest-boxlite: run tests in microVMs. The plugin itself lands with its own issue; `vmm` is the runtime."""
