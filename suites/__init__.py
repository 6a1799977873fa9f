"""Suite YAML files shipped with growbench (installed as growbench.suites)."""
