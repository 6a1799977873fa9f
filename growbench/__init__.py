"""growbench: a benchmark harness for neural-network growth methods."""
__version__ = "0.1.0"
