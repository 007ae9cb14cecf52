"""Configuration: the device cfgstring (and later the YAML config file)."""
