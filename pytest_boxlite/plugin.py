"""The pytest plugin entry point (registered as `boxlite`). Options, marker and fixtures come with the plugin issue."""
